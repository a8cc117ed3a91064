"""ScaleKD (Fan et al., "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024; code:
deep-optimization/ScaleKD @ 478a7db, mmcls): a Swin or ViT teacher distilled into a CNN at its last two stages.

(a) the teacher's final map ("stage4") and logits, and, inside the loss, its layers after stage 3 (`last_stage`
of its module); (b) no statistics; (c) cross-attention projectors (CAPs), one per distilled stage and view, their
BatchNorm statistics as the head state, and the student's classifier as wide as the teacher's, all dropped at
export; (d) below; (e) not cacheable: the loss runs the teacher's last stage on the student's projected maps.

The loss (mmcls/models/classifiers/distiller.py, dis_losses/fmdv2.py, kd.py):
- Teacher parameter perception (TPP): the student's stage-3 map -> a CAP per view (learned queries on the teacher's
  stage-3 grid, the teacher's stage-3 width) -> the frozen teacher's last stage (Swin: the last PatchMerging, the
  last stage's blocks, the final norm) -> compared with the teacher's final map. Those outputs are the queries of
  the stage-4 CAPs (spatial feeds spatial, frequency feeds frequency, not detached), whose outputs are compared
  with the teacher's final map too. The teacher's stage-3 map is never distilled directly.
- Dual-view feature mimicking: the spatial view `sum((n(s) - n(t))**2) / B`, n the L2 normalisation over channels
  at each position; the frequency view the same after the DC component of the 2-D DCT is removed, which is each
  channel's spatial mean (tests/test_scalekd.py checks it against scipy's DCT); weights (0.08, 0.06) per stage.
- Logits: `(1 - a) CE(y, z_s) - a T^2 mean_b sum_c softmax(z_t / T) log softmax(z_s / T)`, a = 0.5, T = 1 (KDLoss);
  the CE term only with config.scalekd.labels. The label-free variant keeps the KD term and its weight a.

A CAP (AttentionProjector with WindowMultiheadPosAttention, window (1, 1)): the student map -> Conv3x3 -> BN ->
ReLU, plus a learned position embedding; the queries (a learned Embedding(n, C_t), N(0, 1), or given tokens) ->
Conv1x1 -> ReLU; attention q = Linear(queries), k, v = Linear(student tokens), logits q k^T * d_head**-0.5 *
softmax_scale, softmax, output Linear, no residual; then x = LayerNorm(x) (eps 1e-5) and x + MLP(x) (mmcv's FFN:
Linear C_t -> 4 C_t, ReLU, Linear back). PyTorch's default inits; the position embedding N(0, 0.02).

Where this departs from the official code:
- The position embedding has the student map's size, as in fmd.py (`pos_hw`); fmdv2.py sizes it to the query
  grid, the same wherever the two agree (every official CNN-student config). So a ViT teacher's 14x14 queries
  attend to a ResNet's 7x7 stage-4 map, without interpolation.
- ViT teachers: stage 3 ends after block 9 of 12 (the official split after 0-based blocks 2, 5, 8, 11), and the
  TPP runs blocks 10-12 and the final LayerNorm, the exact remainder, on the patch tokens alone. The official
  ViT path runs blocks 9-11 (block 9 a second time) for stage 3 and passes the stage-4 CAP's output through
  block 12 and the norm; here every teacher is treated as the Swin path is, the stage-4 CAP's output compared with
  the teacher's final map directly.
- The teacher runs in eval mode (no stochastic depth); the official distiller calls teacher.eval() once, and
  mmengine's model.train() turns its drop path back on.
- The Conv1x1 on the queries is a Dense on the tokens (the same map); the soft-target CE takes log_softmax
  rather than log(softmax) (equal, without underflow).
- config.scalekd.tpp=False, an ablation: the stage-4 CAPs alone, with learned queries on the teacher's stage-4 grid.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdep_jax import losses, models, teacher as teacher_lib
from kdep_jax.errors import ConfigError
from kdep_jax.methods.base import Method
from kdep_jax.models.layers import (BatchNorm, Dtype, cpu_conv_hook, layer_norm, relu, torch_default_bias_init,
                                    torch_default_kernel_init, torch_linear)

VIEWS = ("spatial", "frequency")
STAGES = (3, 4)


class PositionAttention(nn.Module):
    """WindowMultiheadPosAttention with one window: the queries attend to the student's tokens."""
    dim: int
    num_heads: int
    softmax_scale: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
        batch, head_dim = queries.shape[0], self.dim // self.num_heads

        def heads(x):
            return x.reshape(batch, -1, self.num_heads, head_dim).transpose(0, 2, 1, 3)

        q = heads(torch_linear(self.dim, queries.shape[-1], self.dtype, "q")(queries))
        k = heads(torch_linear(self.dim, tokens.shape[-1], self.dtype, "k")(tokens))
        v = heads(torch_linear(self.dim, tokens.shape[-1], self.dtype, "v")(tokens))
        logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) * (head_dim**-0.5 * self.softmax_scale)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, -1, self.dim)
        return torch_linear(self.dim, self.dim, self.dtype, "proj")(out)


class CrossAttentionProjector(nn.Module):
    """A student map (B, h, w, C_s) -> (B, n, C_t) tokens on the teacher's grid (row-major), float32.

    learned_queries: n, the size of the learned query table; 0 when the queries are given to the call.
    Variable names follow the official AttentionProjector's.
    """
    teacher_dim: int
    num_heads: int
    softmax_scale: float
    learned_queries: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, queries: jax.Array | None, train: bool) -> jax.Array:
        batch, height, width, channels = x.shape
        x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_default_kernel_init,
                    bias_init=torch_default_bias_init(9 * channels), dtype=self.dtype, param_dtype=jnp.float32,
                    name="proj_student_0", conv_general_dilated=cpu_conv_hook())(x.astype(self.dtype))
        x = relu(BatchNorm(dtype=self.dtype, name="proj_student_1")(x, train))
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, height, width, channels), jnp.float32)
        x = (x + pos_embed.astype(self.dtype)).reshape(batch, height * width, channels)
        if self.learned_queries:
            table = self.param("query", nn.initializers.normal(1.0), (self.learned_queries, self.teacher_dim),
                               jnp.float32)
            queries = jnp.broadcast_to(table, (batch, *table.shape))
        queries = relu(torch_linear(self.teacher_dim, self.teacher_dim, self.dtype, "proj_pos_0")(
            queries.astype(self.dtype)))
        x = PositionAttention(self.teacher_dim, self.num_heads, self.softmax_scale, self.dtype,
                              name="pos_attention")(queries, x)
        x = layer_norm(1e-5, self.dtype, "norm")(x)
        hidden = relu(torch_linear(4 * self.teacher_dim, self.teacher_dim, self.dtype, "ffn_0")(x))
        return (x + torch_linear(self.teacher_dim, 4 * self.teacher_dim, self.dtype, "ffn_1")(hidden)).astype(
            jnp.float32)


def _normalize(x: jax.Array) -> jax.Array:
    """F.normalize over channels (the last axis): x / max(||x||, 1e-12), with a gradient that stays finite at 0."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


def spatial_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """The spatial view: sum over positions and channels of (n(s) - n(t))**2, divided by the batch size."""
    student, teacher = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    return jnp.sum(jnp.square(_normalize(student) - _normalize(teacher))) / student.shape[0]


def frequency_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """The frequency view: the spatial loss of the (B, H, W, C) maps without their DC component. The 2-D DCT-II's
    (0, 0) basis is constant, so zeroing that coefficient and inverting subtracts each channel's spatial mean."""
    def without_dc(x):
        x = jnp.asarray(x, jnp.float32)
        return x - x.mean(axis=(1, 2), keepdims=True)

    return spatial_loss(without_dc(student), without_dc(teacher))


VIEW_LOSSES = {"spatial": spatial_loss, "frequency": frequency_loss}


@functools.partial(jax.jit, static_argnums=0)
def _init_projector(projector: CrossAttentionProjector, key, student_map, queries) -> dict:
    return projector.init(key, student_map, queries, train=False)


def soft_target_cross_entropy(student_logits, teacher_logits, temperature: float) -> jax.Array:
    """`-T^2 mean_b sum_c softmax(z_t / T) log softmax(z_s / T)` (KDLoss without its alpha), float32."""
    t = float(temperature)
    p_t = jax.nn.softmax(jnp.asarray(teacher_logits, jnp.float32) / t, axis=-1)
    log_p_s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / t, axis=-1)
    return -t * t * jnp.mean(jnp.sum(p_t * log_p_s, axis=-1))


class ScaleKD(Method):
    name = "scalekd"
    teacher_outputs = ("logits", "stage4")
    student_logits = True
    label_free_fix = "set --config.scalekd.labels=False (ScaleKD's label-free variant, for unlabeled images)"

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.scalekd
        self.needs_labels = bool(self.settings.labels)
        self.last_stage = teacher_lib.last_stage_fn(config)

    @functools.cached_property
    def maps(self) -> dict[tuple[str, int], tuple[int, int, int]]:
        """(H, W, C) of the student's and the teacher's stage-3 and stage-4 maps at config.data.image_size, by
        ("student" or "teacher", stage)."""
        size = self.config.data.image_size
        networks = {"student": models.from_config(self.config.student), "teacher": teacher_lib.model(self.config)}
        shapes = {}
        for role, network in networks.items():
            _, features = jax.eval_shape(lambda network=network: network.init_with_output(
                jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)[0])
            shapes.update({(role, stage): tuple(features[f"stage{stage}"].shape[1:]) for stage in STAGES})
        return shapes

    @functools.cached_property
    def projectors(self) -> dict[str, CrossAttentionProjector]:
        """The CAPs by name ("stage3_spatial", ...): the stage-3 ones only with teacher parameter perception."""
        s = self.settings
        dtype = jnp.dtype(self.config.dtype)
        projectors = {}
        for view in VIEWS:
            if s.tpp:
                projectors[f"stage3_{view}"] = CrossAttentionProjector(
                    self.maps["teacher", 3][2], s.num_heads[0], s.softmax_scale, s.query_sizes[0] ** 2, dtype)
            projectors[f"stage4_{view}"] = CrossAttentionProjector(
                self.maps["teacher", 4][2], s.num_heads[1], s.softmax_scale, 0 if s.tpp else s.query_sizes[1] ** 2,
                dtype)
        return projectors

    def check(self, teacher_dim, student_dim, teacher_classes):
        super().check(teacher_dim, student_dim, teacher_classes)
        s, arch, size = self.settings, self.config.teacher.arch, self.config.data.image_size
        if s.tpp and not hasattr(teacher_lib.model(self.config), "last_stage"):
            raise ConfigError(
                f"config.method='scalekd' runs the frozen teacher's last stage on the student's projected stage-3 map "
                f"(teacher parameter perception), which only the transformer teachers offer (swin_t/s/b, vit_*); "
                f"config.teacher.arch={arch!r} has none. Use a Swin or ViT teacher, or turn the perception off with "
                f"--config.scalekd.tpp=False.")
        try:
            maps = self.maps
        except ValueError as error:
            raise ConfigError(f"config.method='scalekd' cannot build the teacher or the student at "
                              f"config.data.image_size={size}: {error}") from None
        grids = tuple(maps["teacher", stage][0] for stage in STAGES)
        for index, stage in enumerate(STAGES):
            if stage == 3 and not s.tpp:
                continue
            height, width, channels = maps["teacher", stage]
            if s.query_sizes[index] != height:
                raise ConfigError(
                    f"config.scalekd.query_sizes={tuple(s.query_sizes)}: the stage-{stage} projectors' queries lie on "
                    f"the teacher's stage-{stage} grid (stage 3: their output enters the teacher's last stage; stage 4: "
                    f"it is compared with the teacher's final map), which is {height}x{width} for {arch} at "
                    f"config.data.image_size={size}. Set --config.scalekd.query_sizes='{grids}'.")
            student_height, student_width, _ = maps["student", stage]
            if s.weights[index][1] and student_height * student_width == 1:
                raise ConfigError(
                    f"config.scalekd.weights={tuple(map(tuple, s.weights))}: the student's stage-{stage} map is 1x1 at "
                    f"config.data.image_size={size}, so every query of its projectors attends to that one position "
                    f"and gets the same output: the frequency view (the map minus its spatial mean) is zero, and its "
                    f"normalisation's gradient unbounded. Use larger images, or give the stage-{stage} frequency view "
                    f"weight 0 in --config.scalekd.weights.")
            if channels % s.num_heads[index]:
                divisors = [d for d in range(1, 33) if channels % d == 0]
                raise ConfigError(
                    f"config.scalekd.num_heads={tuple(s.num_heads)}: the stage-{stage} projectors split the teacher's "
                    f"{channels} stage-{stage} channels over {s.num_heads[index]} heads, which does not divide them. "
                    f"Choose a divisor of {channels} (e.g. one of {divisors}).")

    def init_head(self, key, student_dim, statistics):
        height, width, channels = self.maps["teacher", 4]
        params, state = {}, {}
        for index, (name, projector) in enumerate(self.projectors.items()):
            student_map = jnp.zeros((2, *self.maps["student", int(name[len("stage")])]))
            queries = None if projector.learned_queries else jnp.zeros((2, height * width, channels))
            # The "rbg" generator compiles far faster than the default on CPU (see trainer.init_variables); the two
            # views' projectors are equal modules, so they share one compiled init.
            view_key = jax.random.key(jax.random.bits(jax.random.fold_in(key, index)), impl="rbg")
            variables = _init_projector(projector, view_key, student_map, queries)
            params[name], state[name] = variables["params"], variables["batch_stats"]
        return params, state

    def targets(self, teacher_outputs, constants):
        return teacher_outputs  # {"logits", "stage4"}

    def loss(self, head, head_state, student, targets, context=None):
        s = self.settings
        final = targets["stage4"]
        batch, height, width, channels = final.shape
        new_state, terms = {}, {}

        def project(name, student_map, queries):
            out, updates = self.projectors[name].apply({"params": head[name], "batch_stats": head_state[name]},
                                                       student_map, queries, train=True, mutable=["batch_stats"])
            new_state[name] = updates["batch_stats"]
            return out

        for index, view in enumerate(VIEWS):
            queries = None
            if s.tpp:
                side = s.query_sizes[0]
                projected = project(f"stage3_{view}", student["stage3"], None).reshape(batch, side, side, -1)
                perceived = self.last_stage(context.teacher, projected)
                terms[f"{view}_stage3"] = s.weights[0][index] * VIEW_LOSSES[view](perceived, final)
                queries = perceived.reshape(batch, height * width, channels)
            projected = project(f"stage4_{view}", student["stage4"], queries).reshape(final.shape)
            terms[f"{view}_stage4"] = s.weights[1][index] * VIEW_LOSSES[view](projected, final)
        terms["kd"] = s.kd_alpha * soft_target_cross_entropy(student["logits"], targets["logits"], s.kd_temperature)
        if self.needs_labels:
            terms["ce"] = (1.0 - s.kd_alpha) * losses.cross_entropy_loss(student["logits"], context.labels)
        return sum(terms.values()), new_state, terms
