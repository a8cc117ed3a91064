"""torchvision's SwinTransformer (v1: swin_t, swin_s, swin_b) in Flax Linen, NHWC throughout as torchvision's.

Numerics as torchvision: LayerNorm eps 1e-5, exact (erf) GELU, relative position bias gathered with the
recomputed relative_position_index (a buffer in torch, a constant here), the shifted windows' mask -100
between regions, PatchMerging's concatenation order (0::2, 0::2), (1::2, 0::2), (0::2, 1::2), (1::2, 1::2)
over (H, W). Any input size works as in torchvision: each block pads its map on the bottom and right to a
multiple of the window (the padded zeros take part in the attention, as there) and does not shift when the
window covers the padded map (at 224 px the last stage's 7x7 map; at 64 px the last two stages).

Variable names mirror torchvision's keys with "." written as "_" (`features_1_0/attn/qkv/kernel` is
`features.1.0.attn.qkv.weight`); `relative_position_bias_table` is stored in torch's layout.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdep_jax.models.layers import (Dtype, cpu_conv_hook, dense, gelu, layer_norm, stochastic_depth,
                                    torch_default_bias_init, torch_default_kernel_init)
from kdep_jax.models.naming import TorchNaming, batchnorm_buffers
from kdep_jax.models.preprocessing import Preprocessing

CONFIGS = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.2),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), stochastic_depth_prob=0.3),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), stochastic_depth_prob=0.5),
}
EPSILON = 1e-5
MASK_VALUE = -100.0

# torchvision re-initialises every Linear with trunc_normal_(std=0.02) (cut at +-2 absolute: a normal) and a
# zero bias; the relative position bias table is N(0, 0.02); the patch conv keeps torch's default init.
_linear_init = nn.initializers.normal(0.02)


def relative_position_index(window_size: int) -> np.ndarray:
    """(window_size**4,) int64: the row of the bias table for each (query, key) pair of a window, as torchvision."""
    coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
    return (relative[:, :, 0] * (2 * window_size - 1) + relative[:, :, 1]).reshape(-1).astype(np.int64)


def torch_buffers(key: str, array: np.ndarray) -> dict[str, np.ndarray]:
    """Each attention's relative_position_index buffer, after its table ((2w - 1)^2, heads); BatchNorm's as usual."""
    if key.endswith(".relative_position_bias_table"):
        window_size = (round(np.sqrt(array.shape[0])) + 1) // 2
        index_key = key.removesuffix("relative_position_bias_table") + "relative_position_index"
        return {index_key: relative_position_index(window_size)}
    return batchnorm_buffers(key, array)


def shift_mask(height: int, width: int, window_size: int, shift: tuple[int, int]) -> np.ndarray:
    """(num_windows, N, N) additive mask of a shifted window attention on a (padded) height x width map: 0 within
    a region of the rolled map, -100 across regions. The slices are torchvision's, edge cases included."""
    regions = np.zeros((height, width), np.float32)
    h_slices = ((0, -window_size), (-window_size, -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size), (-window_size, -shift[1]), (-shift[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        regions[h[0]:h[1], w[0]:w[1]] = count
    windows = regions.reshape(height // window_size, window_size, width // window_size, window_size)
    windows = windows.transpose(0, 2, 1, 3).reshape(-1, window_size * window_size)
    return np.where(windows[:, None, :] != windows[:, :, None], MASK_VALUE, 0.0).astype(np.float32)


class ShiftedWindowAttention(nn.Module):
    """Multi-head self-attention within (shifted) windows, with a learned relative position bias."""
    num_heads: int
    window_size: int
    shift_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        window = self.window_size
        table = self.param("relative_position_bias_table", _linear_init, ((2 * window - 1) ** 2, self.num_heads),
                           jnp.float32)
        pad_bottom, pad_right = -height % window, -width % window
        x = jnp.pad(x, ((0, 0), (0, pad_bottom), (0, pad_right), (0, 0)))
        padded_height, padded_width = height + pad_bottom, width + pad_right
        shift = (0 if window >= padded_height else self.shift_size, 0 if window >= padded_width else self.shift_size)
        if sum(shift):
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        rows, cols, length = padded_height // window, padded_width // window, window * window
        windows = x.reshape(batch, rows, window, cols, window, dim).transpose(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch * rows * cols, length, dim)

        head_dim = dim // self.num_heads
        qkv = dense(3 * dim, _linear_init, self.dtype, "qkv")(windows)
        q, k, v = qkv.reshape(-1, length, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        logits = ((q * head_dim**-0.5) @ k.swapaxes(-1, -2)).astype(jnp.float32)
        bias = table[relative_position_index(window)].reshape(length, length, self.num_heads).transpose(2, 0, 1)
        logits = logits + bias
        if sum(shift):
            mask = shift_mask(padded_height, padded_width, window, shift)  # (rows * cols, length, length)
            logits = (logits.reshape(batch, rows * cols, self.num_heads, length, length) + mask[None, :, None])
            logits = logits.reshape(-1, self.num_heads, length, length)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(-1, length, dim)
        out = dense(dim, _linear_init, self.dtype, "proj")(out)

        out = out.reshape(batch, rows, cols, window, window, dim).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(batch, padded_height, padded_width, dim)
        if sum(shift):
            out = jnp.roll(out, shift, axis=(1, 2))
        return out[:, :height, :width]


class SwinBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); stochastic depth on both branches (identity in eval)."""
    num_heads: int
    window_size: int
    shift_size: int
    stochastic_depth_prob: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dim = x.shape[-1]
        y = ShiftedWindowAttention(self.num_heads, self.window_size, self.shift_size, self.dtype, name="attn")(
            layer_norm(EPSILON, self.dtype, "norm1")(x))
        x = x + stochastic_depth(self, y, self.stochastic_depth_prob, train)
        y = gelu(dense(4 * dim, _linear_init, self.dtype, "mlp_0")(layer_norm(EPSILON, self.dtype, "norm2")(x)))
        y = dense(dim, _linear_init, self.dtype, "mlp_3")(y)
        return x + stochastic_depth(self, y, self.stochastic_depth_prob, train)


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated in torchvision's order (an odd side is zero-padded), norm, linear 4C -> 2C."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width, dim = x.shape[1:]
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = layer_norm(EPSILON, self.dtype, "norm")(x)
        return dense(2 * dim, _linear_init, self.dtype, "reduction", use_bias=False)(x)


class SwinTransformer(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None. See kdep_jax.models for features.

    features["pre_relu"] and ["pooled"]: the average over positions of the final norm's output (what the head
    sees). features["stage1".."stage4"]: the outputs of features.1, .3, .5 and .7 (NHWC), stage4 after the
    final norm. All float32 whatever the dtype.
    """
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    stochastic_depth_prob: float = 0.2
    num_classes: int | None = 1000
    dtype: Dtype = jnp.float32

    torch_naming = TorchNaming(head="head", buffers=torch_buffers)
    preprocessing = Preprocessing(232 / 224, "bicubic")  # torchvision Swin_T_Weights: resize 232 bicubic

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def setup(self):
        patch = self.patch_size
        self.patch_embed = nn.Conv(self.embed_dim, (patch, patch), strides=(patch, patch), padding="VALID",
                                   kernel_init=torch_default_kernel_init,
                                   bias_init=torch_default_bias_init(3 * patch * patch), dtype=self.dtype,
                                   param_dtype=jnp.float32, name="features_0_0",
                                   conv_general_dilated=cpu_conv_hook())
        self.patch_norm = layer_norm(EPSILON, self.dtype, "features_0_2")
        total_blocks = sum(self.depths)
        self.blocks = [
            [SwinBlock(num_heads, self.window_size, 0 if index % 2 == 0 else self.window_size // 2,
                       self.stochastic_depth_prob * (sum(self.depths[:stage]) + index) / (total_blocks - 1),
                       self.dtype, name=f"features_{2 * stage + 1}_{index}") for index in range(depth)]
            for stage, (depth, num_heads) in enumerate(zip(self.depths, self.num_heads))]
        self.merges = [PatchMerging(self.dtype, name=f"features_{2 * stage}") for stage in range(1, len(self.depths))]
        self.norm = layer_norm(EPSILON, self.dtype, "norm")
        if self.num_classes is not None:
            self.head = dense(self.num_classes, _linear_init, self.dtype, "head")

    def _stage(self, stage: int, x: jax.Array, train: bool) -> jax.Array:
        """Stage `stage` (0-based): the PatchMerging before it (none before the first), then its blocks."""
        if stage > 0:
            x = self.merges[stage - 1](x)
        for block in self.blocks[stage]:
            x = block(x, train)
        return x

    def __call__(self, x: jax.Array, train: bool = False):
        x = self.patch_norm(self.patch_embed(x.astype(self.dtype)))
        stages = []
        for stage in range(len(self.depths)):
            x = self._stage(stage, x, train)
            stages.append(x)
        x = self.norm(x)
        stages[-1] = x
        pooled = x.astype(jnp.float32).mean(axis=(1, 2))
        features = {"pre_relu": pooled, "pooled": pooled,
                    **{f"stage{index}": value.astype(jnp.float32) for index, value in enumerate(stages, start=1)}}
        logits = None
        if self.num_classes is not None:
            logits = self.head(pooled.astype(self.dtype)).astype(jnp.float32)
        return logits, features

    def last_stage(self, x: jax.Array) -> jax.Array:
        """The network after stage 3, from a map shaped as features["stage3"] (B, H, W, C): the last PatchMerging
        (features.6 in torchvision's Swin-T), the last stage's blocks (features.7) and the final norm; returns the
        (B, H/2, W/2, 2C) map, float32, as features["stage4"]. On the teacher's own stage-3 map it gives its
        stage4; ScaleKD's teacher parameter perception feeds it a projected student map:
        `model.apply(variables, x, method="last_stage")`. Eval mode: no stochastic depth."""
        return self.norm(self._stage(len(self.depths) - 1, x.astype(self.dtype), False)).astype(jnp.float32)
