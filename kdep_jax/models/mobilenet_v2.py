"""torchvision's MobileNetV2 in Flax Linen, NHWC, including its width_mult channel rule.

Module names mirror torchvision's state_dict keys with "." written as "_": `features_0_0` is
`features.0.0`, `features_3/conv_1_1` is `features.3.conv.1.1`, the head is `classifier_1`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models.layers import BatchNorm, Dtype, conv2d, conv_bn, global_avg_pool
from kdep_jax.models.naming import TorchNaming
from kdep_jax.models.preprocessing import IMAGENET

# (expand ratio t, output channels c, repeats n, first stride s), as in torchvision.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The blocks whose outputs are features["stage1".."stage3"]: the last ones at strides 4, 8 and 16 (24, 32 and 96
# channels at width 1). features["stage4"] is the output of the final 1x1 conv, features.18, after its ReLU6
# (stride 32): the map "pooled" averages.
STAGE_ENDS = {3: "stage1", 6: "stage2", 13: "stage3"}


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: nearest multiple of divisor, never more than 10% below value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def last_channel(width: float) -> int:
    """The final 1x1 conv's width: torchvision never shrinks it below 1280."""
    return make_divisible(1280 * max(1.0, width))


class InvertedResidual(nn.Module):
    """[1x1 expand, ReLU6], 3x3 depthwise, ReLU6, 1x1 linear projection; residual when shapes allow."""
    out_channels: int
    stride: int
    expand_ratio: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = round(in_channels * self.expand_ratio)
        y = x
        index = 0  # position in torchvision's block.conv Sequential
        if self.expand_ratio != 1:
            y = jax.nn.relu6(conv_bn(y, hidden, 1, 1, train, f"conv_{index}", dtype=self.dtype))
            index += 1
        y = jax.nn.relu6(conv_bn(y, hidden, 3, self.stride, train, f"conv_{index}", depthwise=True,
                                 dtype=self.dtype))
        y = conv2d(self.out_channels, 1, dtype=self.dtype, name=f"conv_{index + 1}")(y)
        y = BatchNorm(dtype=self.dtype, name=f"conv_{index + 2}")(y, train)
        if self.stride == 1 and in_channels == self.out_channels:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None.

    features["pre_relu"]: pooled output of the final 1x1 conv + BN before ReLU6; features["pooled"]: the usual
    penultimate feature (after ReLU6, pooled); features["stage1".."stage4"]: the outputs of features.3, .6, .13
    and .18 (see STAGE_ENDS), NHWC. Logits and features are float32 whatever the dtype.
    The classifier's dropout (torchvision's p=0.2) is applied only in train mode and only when the caller
    passes a "dropout" rng, so `apply(..., train=True, mutable=["batch_stats"])` works without one.
    """
    num_classes: int | None = 1000
    width: float = 1.0
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32

    torch_naming = TorchNaming(head="classifier.1")
    preprocessing = IMAGENET

    @property
    def feature_dim(self) -> int:
        return last_channel(self.width)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        x = x.astype(self.dtype)
        x = jax.nn.relu6(conv_bn(x, make_divisible(32 * self.width), 3, 2, train, "features_0", dtype=self.dtype))
        features = {}
        index = 1
        for expand_ratio, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                x = InvertedResidual(make_divisible(channels * self.width), stride, expand_ratio, self.dtype,
                                     name=f"features_{index}")(x, train)
                if index in STAGE_ENDS:
                    features[STAGE_ENDS[index]] = x.astype(jnp.float32)
                index += 1
        pre_relu = conv_bn(x, last_channel(self.width), 1, 1, train, f"features_{index}", dtype=self.dtype)
        x = jax.nn.relu6(pre_relu)
        features.update(stage4=x.astype(jnp.float32), pre_relu=global_avg_pool(pre_relu), pooled=global_avg_pool(x))
        logits = None
        if self.num_classes is not None:
            use_dropout = train and self.has_rng("dropout")
            pooled = nn.Dropout(self.dropout_rate, deterministic=not use_dropout)(features["pooled"])
            logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                              param_dtype=jnp.float32, name="classifier_1")(pooled)
            logits = logits.astype(jnp.float32)
        return logits, features
