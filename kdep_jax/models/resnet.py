"""torchvision's ResNet-18/34/50 (v1.5: the stride of a bottleneck is on its 3x3 conv) in Flax Linen, NHWC.

Module names mirror torchvision's state_dict keys with "." written as "_": `layer4_2/bn3` is
`layer4.2.bn3`, `layer1_0/downsample_0` is `layer1.0.downsample.0`, the head is `fc`.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models.layers import (BatchNorm, ConvOfActivation, Dtype, PooledConv, conv2d, global_avg_pool,
                                    max_pool, pools_before_activation, relu, torch_linear)
from kdep_jax.models.naming import TorchNaming
from kdep_jax.models.preprocessing import IMAGENET


class ResNetBlock(nn.Module):
    """BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3, 1x1 with 4x expansion).

    Returns the residual sum, after the block's final ReLU where `relu`: every block but the last, whose sum before
    it is KDEP's pre-ReLU feature.
    """
    planes: int
    stride: int
    bottleneck: bool
    dtype: Dtype = jnp.float32
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.bottleneck:
            out_channels = 4 * self.planes
            convs = ((self.planes, 1, 1), (self.planes, 3, self.stride), (out_channels, 1, 1))
        else:
            out_channels = self.planes
            convs = ((self.planes, 3, self.stride), (self.planes, 3, 1))

        def shortcut(affine: bool = False):
            """The shortcut; with affine, (the downsampling conv's output, its BatchNorm's map) or (x, None)."""
            if self.stride == 1 and x.shape[-1] == out_channels:
                return (x, None) if affine else x
            identity = conv2d(out_channels, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
            bn = BatchNorm(dtype=self.dtype, name="downsample_1")
            return (identity, bn(identity, train, affine=True)) if affine else bn(identity, train)

        y = conv2d(convs[0][0], convs[0][1], convs[0][2], dtype=self.dtype, name="conv1")(x)
        for index, (features, kernel_size, stride) in enumerate(convs[1:], start=2):
            # bn{index - 1} and its ReLU applied by the next conv, which can then keep y alone for its backward pass.
            scale, shift = BatchNorm(dtype=self.dtype, name=f"bn{index - 1}")(y, train, affine=True)
            conv = ConvOfActivation(features, kernel_size, stride, dtype=self.dtype, name=f"conv{index}")
            if index == len(convs) and not (train or self.is_initializing()):
                # In eval mode the last conv computes the block's end too (one AMX kernel, where that runs), with the
                # shortcut's BatchNorm; its BatchNorm's map reads only the width of what it is given. (Initialising
                # goes below, where the parameters come in torchvision's order.)
                identity, identity_map = shortcut(affine=True)
                end = BatchNorm(dtype=self.dtype, name=f"bn{index}")(identity, train, affine=True)
                return conv(y, scale, shift, block_end=(*end, identity, self.relu), residual_map=identity_map)
            y = conv(y, scale, shift)
        y = BatchNorm(dtype=self.dtype, name=f"bn{len(convs)}")(y, train)
        identity = shortcut()
        return relu(y + identity) if self.relu else y + identity


class ResNet(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None.

    features["pre_relu"]: pooled residual sum of the last block before its ReLU; features["pooled"]: the usual
    penultimate feature (after the ReLU, pooled); features["stage1".."stage4"]: the outputs of layer1..layer4
    (after their ReLU, NHWC). Logits and features are float32 whatever the dtype.
    """
    stage_sizes: Sequence[int]
    bottleneck: bool
    num_classes: int | None = 1000
    base_width: int = 64
    dtype: Dtype = jnp.float32

    torch_naming = TorchNaming(head="fc")
    preprocessing = IMAGENET

    @property
    def feature_dim(self) -> int:
        return self.base_width * 8 * (4 if self.bottleneck else 1)

    def stem(self, x: jax.Array, train: bool) -> jax.Array:
        """conv1, bn1, its ReLU and the max-pool. Where `pools_before_activation`, the pool comes first: a channel's
        BatchNorm map and ReLU (rounded to the dtype or not) rise with x where its scale is >= 0 and fall elsewhere,
        so a window's largest activation is that of its largest x there, of its smallest elsewhere, which is the
        largest of the conv with that channel's kernel negated (exactly -x). The same values: one kernel computes the
        conv's sums and pools them (and in training gives their batch statistics: `PooledConv`), where XLA's fusion
        computed each window's nine activations, and the BatchNorm and ReLU (and in training their gradients) run on
        a quarter of the values. In training the batch statistics are those of the conv's sums, and each window's
        gradient goes to its largest float32 sum, where the other order gives it to the first of the activations
        that round to the same bfloat16 maximum."""
        bn = BatchNorm(dtype=self.dtype, name="bn1")
        if self.is_initializing() or not pools_before_activation(x, 3):
            x = conv2d(self.base_width, 7, 2, dtype=self.dtype, name="conv1")(x)
            return max_pool(relu(bn(x, train)), 3, 2, 1, shifted_max=jax.default_backend() == "cpu")
        signs = jnp.where(self.variables["params"]["bn1"]["scale"] < 0, -1.0, 1.0)  # the sign of the map's scale
        conv = PooledConv(self.base_width, 7, 2, (3, 2, 1), dtype=self.dtype, name="conv1")
        if train:
            pooled, *statistics = conv(x, signs, train)
            scale, shift = bn(pooled, train, affine=True, signs=signs, statistics=tuple(statistics))
        else:
            pooled = conv(x, signs, train)
            scale, shift = bn(pooled, train, affine=True)  # from the running statistics
        return relu((pooled * signs * scale + shift).astype(self.dtype))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        x = self.stem(x.astype(self.dtype), train)
        features = {}
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                last = stage == len(self.stage_sizes) - 1 and block == num_blocks - 1
                x = ResNetBlock(self.base_width * 2**stage, stride, self.bottleneck, self.dtype, relu=not last,
                                name=f"layer{stage + 1}_{block}")(x, train)
            if stage == len(self.stage_sizes) - 1:
                pre_relu, x = x, relu(x)
            features[f"stage{stage + 1}"] = x.astype(jnp.float32)
        features.update(pre_relu=global_avg_pool(pre_relu), pooled=global_avg_pool(x))
        logits = None
        if self.num_classes is not None:
            pooled = features["pooled"]
            logits = torch_linear(self.num_classes, pooled.shape[-1], self.dtype, name="fc")(pooled)
            logits = logits.astype(jnp.float32)
        return logits, features
