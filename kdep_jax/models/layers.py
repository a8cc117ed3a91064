"""Building blocks shared by the backbones, written to match torch.nn numerically.

Flax's defaults differ from torch in ways that change results: "SAME" padding pads a stride-2 3x3 conv
(0, 1) where torch pads (1, 1), and flax.linen.BatchNorm updates its running variance with the biased
batch variance where torch uses the unbiased one. The pieces here follow torch.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), a plain (not truncated)
# normal. Flax computes fan_out of an HWIO kernel as kh * kw * O, as torch does for OIHW, depthwise included.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(features: int, kernel_size: int, stride: int = 1, groups: int = 1, dtype: Dtype = jnp.float32,
           name: str | None = None) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding kernel_size // 2 (torchvision's convs all use it)."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, kernel_init=conv_kernel_init, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def torch_linear(features: int, in_features: int, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """A Dense layer with torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(in_features)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(features, kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                    bias_init=bias_init, dtype=dtype, param_dtype=jnp.float32, name=name)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d: eps 1e-5; train mode normalises with the biased batch variance and moves the
    running variance towards the *unbiased* one with momentum 0.1. Statistics are float32 whatever the dtype.

    No axis_name: under jax.jit over a sharded global batch the batch mean is already global (synchronised BN).
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        x = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // channels
            if count < 2:
                raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got input {x.shape}")
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)  # two-pass: no cancellation for large means
            if not self.is_initializing():
                unbiased_var = var * (count / (count - 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
        else:
            mean, var = running_mean.value, running_var.value
        y = (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def conv_bn(x: jax.Array, features: int, kernel_size: int, stride: int, train: bool, name: str, groups: int = 1,
            dtype: Dtype = jnp.float32) -> jax.Array:
    """conv2d then BatchNorm, named `{name}_0` and `{name}_1` like torchvision's Conv2dNormActivation.

    Call it inside a compact method: the layers become submodules of the caller. Returns the BN output
    (no activation), so that callers can keep the pre-activation value.
    """
    x = conv2d(features, kernel_size, stride, groups, dtype, name=f"{name}_0")(x)
    return BatchNorm(dtype=dtype, name=f"{name}_1")(x, train)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C), averaged in float32."""
    return x.astype(jnp.float32).mean(axis=(1, 2))
