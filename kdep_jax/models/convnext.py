"""torchvision's ConvNeXt (convnext_tiny, convnext_small, convnext_base) in Flax Linen, NHWC.

Numerics as torchvision: LayerNorm eps 1e-6 (LayerNorm2d over channels is a LayerNorm over the last NHWC
axis), exact (erf) GELU, 7x7 depthwise convs with bias, per-channel layer scale, stochastic depth (identity
in eval). The final LayerNorm (`classifier.0`) normalises the pooled vector, not the map.

Variable names mirror torchvision's keys with "." written as "_" (`features_1_0/block_3/kernel` is
`features.1.0.block.3.weight`); `layer_scale` is stored in torch's layout (C, 1, 1).
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models.layers import DepthwiseConv, Dtype, cpu_conv_hook, dense, gelu, layer_norm, stochastic_depth
from kdep_jax.models.naming import TorchNaming
from kdep_jax.models.preprocessing import Preprocessing

# (input channels, output channels of the downsampling after the stage or None, blocks), as torchvision's
# CNBlockConfig.
CONFIGS = {
    "convnext_tiny": dict(block_setting=((96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)),
                          stochastic_depth_prob=0.1),
    "convnext_small": dict(block_setting=((96, 192, 3), (192, 384, 3), (384, 768, 27), (768, None, 3)),
                           stochastic_depth_prob=0.4),
    "convnext_base": dict(block_setting=((128, 256, 3), (256, 512, 3), (512, 1024, 27), (1024, None, 3)),
                          stochastic_depth_prob=0.5),
}
EPSILON = 1e-6

# torchvision initialises every Conv2d and Linear with trunc_normal_(std=0.02) (cut at +-2 absolute: a normal)
# and a zero bias.
_weight_init = nn.initializers.normal(0.02)


def _conv(features: int, size: int, dtype: Dtype, name: str) -> nn.Conv:
    """A size x size conv with stride size and bias: the patchify stem (4) and the downsampling layers (2)."""
    return nn.Conv(features, (size, size), strides=(size, size), padding="VALID", kernel_init=_weight_init,
                   dtype=dtype, param_dtype=jnp.float32, name=name, conv_general_dilated=cpu_conv_hook())


class CNBlock(nn.Module):
    """x + stochastic_depth(layer_scale * pwconv2(gelu(pwconv1(norm(dwconv7x7(x))))))."""
    layer_scale: float
    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param("layer_scale", nn.initializers.constant(self.layer_scale), (dim, 1, 1), jnp.float32)
        y = DepthwiseConv(dim, 7, dtype=self.dtype, use_bias=True, kernel_init=_weight_init, name="block_0")(x)
        y = layer_norm(EPSILON, self.dtype, "block_2")(y)
        y = gelu(dense(4 * dim, _weight_init, self.dtype, "block_3")(y))
        y = dense(dim, _weight_init, self.dtype, "block_5")(y) * scale.reshape(dim).astype(self.dtype)
        return x + stochastic_depth(self, y, self.stochastic_depth_prob, train)


class ConvNeXt(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None. See kdep_jax.models for features.

    features["pre_relu"] and ["pooled"]: the final LayerNorm (`classifier.0`) of the average-pooled last stage,
    what the head sees (no activation follows it). features["stage1".."stage4"]: the outputs of features.1, .3,
    .5 and .7 (NHWC). All float32 whatever the dtype.
    """
    block_setting: Sequence[tuple[int, int | None, int]] = CONFIGS["convnext_tiny"]["block_setting"]
    stochastic_depth_prob: float = 0.1
    layer_scale: float = 1e-6
    num_classes: int | None = 1000
    dtype: Dtype = jnp.float32

    torch_naming = TorchNaming(head="classifier.2")
    preprocessing = Preprocessing(236 / 224)  # torchvision ConvNeXt_Tiny_Weights: resize 236 bilinear

    @property
    def feature_dim(self) -> int:
        in_channels, out_channels, _ = self.block_setting[-1]
        return in_channels if out_channels is None else out_channels

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        x = _conv(self.block_setting[0][0], 4, self.dtype, "features_0_0")(x.astype(self.dtype))
        x = layer_norm(EPSILON, self.dtype, "features_0_1")(x)
        stages = []
        total_blocks, block_id, index = sum(blocks for _, _, blocks in self.block_setting), 0, 1
        for _, out_channels, blocks in self.block_setting:
            for block in range(blocks):
                x = CNBlock(self.layer_scale, self.stochastic_depth_prob * block_id / (total_blocks - 1.0),
                            self.dtype, name=f"features_{index}_{block}")(x, train)
                block_id += 1
            stages.append(x)
            index += 1
            if out_channels is not None:
                x = layer_norm(EPSILON, self.dtype, f"features_{index}_0")(x)
                x = _conv(out_channels, 2, self.dtype, f"features_{index}_1")(x)
                index += 1
        pooled = layer_norm(EPSILON, self.dtype, "classifier_0")(x.astype(jnp.float32).mean(axis=(1, 2)))
        pooled = pooled.astype(jnp.float32)
        features = {"pre_relu": pooled, "pooled": pooled,
                    **{f"stage{number}": value.astype(jnp.float32) for number, value in enumerate(stages, start=1)}}
        logits = None
        if self.num_classes is not None:
            logits = dense(self.num_classes, _weight_init, self.dtype, "classifier_2")(pooled.astype(self.dtype))
            logits = logits.astype(jnp.float32)
        return logits, features
