"""torchvision's VisionTransformer (vit_b_16, vit_b_32, vit_l_16) in Flax Linen, NHWC input.

Numerics as torchvision: the class token is concatenated *before* the position embedding is added (big_vision
adds it after), LayerNorm eps 1e-6, exact (erf) GELU, q/k/v from one fused projection. The position embedding
has one entry per patch of the image size the model is built for (`image_size`), so a model takes only that
size, as torchvision's does.

Variable names mirror torchvision's modules (see torch_key); `class_token`, `encoder/pos_embedding` and the
attention's `in_proj_weight` / `in_proj_bias` are stored in torch's layout.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax.models.layers import (PACKED_KERNELS, Dtype, attention, cpu_conv_hook, dense, gelu, layer_norm,
                                    matmul, torch_default_kernel_init)
from kdep_jax.models.naming import TorchNaming, torch_leaf
from kdep_jax.models.preprocessing import IMAGENET

CONFIGS = {
    "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_b_32": dict(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": dict(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
}
EPSILON = 1e-6

# torchvision's inits: MLP and in_proj xavier_uniform, MLP biases N(0, 1e-6), patch conv N(0, 1/fan_in)
# (its trunc_normal_ cuts at +-2 absolute, far out in the tails), position embedding N(0, 0.02), head zeros.
_xavier = nn.initializers.xavier_uniform()


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Flax path -> torchvision key. Module names are torchvision's except where torch has a Sequential level:
    `encoder/encoder_layer_3/mlp_0/kernel` is `encoder.layers.encoder_layer_3.mlp.0.weight`, `heads_head/bias`
    is `heads.head.bias`; `class_token` stays `class_token`."""
    *modules, leaf = path
    names = []
    for module in modules:
        if module.startswith("encoder_layer_"):
            names += ["layers", module]
        elif module in ("mlp_0", "mlp_3", "heads_head"):
            names.append(module.replace("_", "."))
        else:
            names.append(module)
    return ".".join([*names, torch_leaf(collection, leaf)])


def current_key(key: str) -> str:
    """Older checkpoints (before pytorch/vision#6053) name the MLP layers mlp.linear_1 / _2, today mlp.0 / mlp.3."""
    return re.sub(r"\.mlp\.linear_([12])\.", lambda match: f".mlp.{3 * (int(match[1]) - 1)}.", key)


class SelfAttention(nn.Module):
    """torch.nn.MultiheadAttention(batch_first=True) called as attention(x, x, x): one fused q/k/v projection
    (`in_proj_weight` (3D, D), torch's layout), softmax(q k^T / sqrt(d)) v per head, then out_proj."""
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        in_proj_weight = self.param("in_proj_weight", _xavier, (3 * dim, dim), jnp.float32)
        in_proj_bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * dim,), jnp.float32)
        packed_weight = self.get_variable(PACKED_KERNELS, "in_proj_weight")
        qkv = matmul(x, in_proj_weight.T.astype(self.dtype), packed_weight) + in_proj_bias.astype(self.dtype)
        out = attention(qkv, self.num_heads, self.dtype)
        # MultiheadAttention keeps torch.nn.Linear's default weight init for out_proj and zeroes its bias.
        return dense(dim, torch_default_kernel_init, self.dtype, name="out_proj")(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = x + SelfAttention(self.num_heads, self.dtype, name="self_attention")(
            layer_norm(EPSILON, self.dtype, "ln_1")(x))
        y = layer_norm(EPSILON, self.dtype, "ln_2")(x)
        bias_init = nn.initializers.normal(1e-6)
        y = gelu(dense(self.mlp_dim, _xavier, self.dtype, "mlp_0", bias_init=bias_init)(y))
        return x + dense(dim, _xavier, self.dtype, "mlp_3", bias_init=bias_init)(y)


class Encoder(nn.Module):
    """Adds the position embedding, runs the blocks, applies the final LayerNorm `ln`.

    Returns (final tokens after `ln`, [tokens after each block listed in stage_ends (1-based)]). first_layer k > 0:
    x holds the tokens after k blocks; the position embedding and the first k blocks are skipped.
    """
    num_layers: int
    num_heads: int
    mlp_dim: int
    stage_ends: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, first_layer: int = 0) -> tuple[jax.Array, list[jax.Array]]:
        if first_layer == 0:
            pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]), jnp.float32)
            x = x + pos_embedding.astype(self.dtype)
        ends = []
        for index in range(first_layer, self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"encoder_layer_{index}")(x)
            if index + 1 in self.stage_ends:
                ends.append(x)
        return layer_norm(EPSILON, self.dtype, "ln")(x), ends


class VisionTransformer(nn.Module):
    """Returns (logits, features); logits is None when num_classes is None. See kdep_jax.models for features.

    features["pre_relu"] and ["pooled"]: the class token after the final LayerNorm (what the head sees).
    features["stage1".."stage4"]: the patch tokens as (B, H/p, W/p, D) maps after blocks L/4, L/2, 3L/4 and
    after the final LayerNorm (L = num_layers; 3, 6, 9 and 12 for ViT-B). All float32 whatever the dtype.
    """
    image_size: int = 224
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int | None = 1000
    dtype: Dtype = jnp.float32

    torch_naming = TorchNaming(head="heads.head", torch_key=torch_key, current_key=current_key)
    preprocessing = IMAGENET  # torchvision ViT_B_16_Weights: resize 256 bilinear, crop 224

    @property
    def feature_dim(self) -> int:
        return self.hidden_dim

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """The blocks (1-based) after which stages 1-3 end: L/4, L/2, 3L/4."""
        return tuple(self.num_layers * stage // 4 for stage in (1, 2, 3))

    def setup(self):
        self.conv_proj = nn.Conv(self.hidden_dim, (self.patch_size, self.patch_size),
                                 strides=(self.patch_size, self.patch_size), padding="VALID",
                                 kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
                                 dtype=self.dtype, param_dtype=jnp.float32, name="conv_proj",
                                 conv_general_dilated=cpu_conv_hook())
        self.class_token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden_dim), jnp.float32)
        self.encoder = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.stage_ends, self.dtype,
                               name="encoder")
        if self.num_classes is not None:
            self.heads_head = dense(self.num_classes, nn.initializers.zeros, self.dtype, "heads_head")

    def __call__(self, x: jax.Array, train: bool = False):
        batch, height, width, _ = x.shape
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"this ViT takes {self.image_size}x{self.image_size} images (its position embedding "
                             f"has one entry per {self.patch_size}-pixel patch), got {height}x{width}: resize "
                             f"the images or build the model with image_size={height}")
        grid = self.image_size // self.patch_size
        x = self.conv_proj(x.astype(self.dtype))
        x = x.reshape(batch, grid * grid, self.hidden_dim)  # row-major patches, as torch's flatten of (h, w)
        x = jnp.concatenate([jnp.broadcast_to(self.class_token.astype(self.dtype), (batch, 1, self.hidden_dim)), x],
                            1)
        x, ends = self.encoder(x)
        maps = [tokens[:, 1:].reshape(batch, grid, grid, self.hidden_dim) for tokens in (*ends, x)]
        class_feature = x[:, 0].astype(jnp.float32)
        features = {"pre_relu": class_feature, "pooled": class_feature,
                    **{f"stage{index}": value.astype(jnp.float32) for index, value in enumerate(maps, start=1)}}
        logits = None
        if self.num_classes is not None:
            logits = self.heads_head(x[:, 0]).astype(jnp.float32)
        return logits, features

    def last_stage(self, x: jax.Array) -> jax.Array:
        """The network after stage 3, from patch tokens shaped as features["stage3"] (B, g, g, D): blocks 3L/4 + 1
        .. L (1-based; 10-12 of ViT-B) and the final LayerNorm, on these tokens alone (no class token: a projected
        student map has none); returns (B, g, g, D) float32. ScaleKD's teacher parameter perception feeds it a
        projected student map: `model.apply(variables, x, method="last_stage")`."""
        batch, height, width, dim = x.shape
        tokens, _ = self.encoder(x.reshape(batch, height * width, dim).astype(self.dtype),
                                 first_layer=self.stage_ends[-1])
        return tokens.reshape(batch, height, width, dim).astype(jnp.float32)
