"""ScaleKD (kdep_jax/methods/scalekd.py): one projector and the dual-view loss against a torch port of the official
formulas, the frequency view against scipy's DCT, gradients through the frozen teacher, the tiny config end to end,
and the inputs it refuses."""
import json
import math
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from PIL import Image

from kdep_jax import convert, data, distill, methods, models, optim, parallel, pipeline, trainer, validation
from kdep_jax import teacher as teacher_lib
from kdep_jax.data import demo as demo_data
from kdep_jax.errors import ConfigError
from kdep_jax.methods.base import LossContext
from kdep_jax.methods.scalekd import CrossAttentionProjector, frequency_loss, spatial_loss
from conftest import REPO, override

TINY_CLASSES = 38  # the demo's upstream classes: the tiny config's CE term uses their labels


def tiny_config(**overrides):
    """configs/methods/scalekd_swin_t_r18.py:tiny, loaded as `--config=` loads it."""
    config = runpy.run_path(str(REPO / "configs" / "methods" / "scalekd_swin_t_r18.py"))["get_config"]("tiny")
    return override(config, overrides)


# ---------------------------------------------------------------------------------------------------------------
# The torch reference, written from the official code (fmdv2.py's AttentionProjector and losses, attention.py's
# WindowMultiheadPosAttention with one window, mmcv's FFN), computed in float64.

class TorchPosAttention(torch.nn.Module):
    def __init__(self, dim, num_heads, input_dims, pos_dims, softmax_scale):
        super().__init__()
        self.num_heads, self.head_dims, self.softmax_scale = num_heads, dim // num_heads, softmax_scale
        self.q, self.k, self.v = (torch.nn.Linear(pos_dims, dim), torch.nn.Linear(input_dims, dim),
                                  torch.nn.Linear(input_dims, dim))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, pos_emb):
        batch, length, _ = x.shape
        n_out = pos_emb.shape[1]
        q = self.q(pos_emb).reshape(batch, n_out, self.num_heads, self.head_dims).permute(0, 2, 1, 3)
        k = self.k(x).reshape(batch, length, self.num_heads, self.head_dims).permute(0, 2, 1, 3)
        v = self.v(x).reshape(batch, length, self.num_heads, self.head_dims).permute(0, 2, 1, 3)
        attn = ((q @ k.transpose(-2, -1)) * self.head_dims**-0.5 * self.softmax_scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch, n_out, -1)
        return self.proj(x)


class TorchProjector(torch.nn.Module):
    """AttentionProjector: pos_embed sized (1, C_s, *hw), hw the query grid (fmdv2.py)."""

    def __init__(self, student_dims, teacher_dims, hw, num_heads, softmax_scale, self_query):
        super().__init__()
        self.hw, self.teacher_dims = hw, teacher_dims
        self.proj_pos = torch.nn.Sequential(torch.nn.Conv2d(teacher_dims, teacher_dims, 1), torch.nn.ReLU())
        self.proj_student = torch.nn.Sequential(torch.nn.Conv2d(student_dims, student_dims, 3, stride=1, padding=1),
                                                torch.nn.BatchNorm2d(student_dims), torch.nn.ReLU())
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, student_dims, *hw))
        torch.nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_attention = TorchPosAttention(teacher_dims, num_heads, student_dims, teacher_dims, softmax_scale)
        # mmcv FFN(embed_dims, 4 * embed_dims): Linear, ReLU, (Dropout 0), Linear, (Dropout 0); identity added.
        self.ffn = torch.nn.Sequential(torch.nn.Linear(teacher_dims, 4 * teacher_dims), torch.nn.ReLU(),
                                       torch.nn.Linear(4 * teacher_dims, teacher_dims))
        self.norm = torch.nn.LayerNorm([teacher_dims])
        self.query = torch.nn.Embedding(hw[0] * hw[1], teacher_dims) if self_query else None

    def forward(self, x, query=None):
        (height, width), batch = self.hw, x.shape[0]
        if query is not None:
            pos_emb = query.permute(0, 2, 1).reshape(batch, -1, height, width).contiguous()
        else:
            pos_emb = self.query.weight.view(1, height, width, self.teacher_dims).permute(0, 3, 1, 2).repeat(
                batch, 1, 1, 1)
        preds_s = self.proj_student(x) + self.pos_embed
        pos_emb = torch.flatten(self.proj_pos(pos_emb).permute(0, 2, 3, 1), 1, 2)
        fea_s = self.pos_attention(torch.flatten(preds_s.permute(0, 2, 3, 1), 1, 2), pos_emb)
        fea_s = self.norm(fea_s)
        return fea_s + self.ffn(fea_s)


def dct_matrix(n):
    """The DCT-II with scipy's norm=None (2 sum_j x_j cos(pi k (2j + 1) / 2n)) as a matrix, and its inverse."""
    k, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    forward = 2 * np.cos(np.pi * k * (2 * j + 1) / (2 * n))
    return torch.from_numpy(forward), torch.from_numpy(np.linalg.inv(forward))


def torch_losses(preds_s, preds_t, alpha):
    """get_spat_loss and get_freq_loss: preds_s (N, HW, C) tokens, preds_t (N, C, H, W)."""
    n, _, height, _ = preds_t.shape
    preds_s = preds_s.permute(0, 2, 1).contiguous().view(*preds_t.shape)
    spatial = F.mse_loss(F.normalize(preds_s, dim=1), F.normalize(preds_t, dim=1), reduction="sum") / n * alpha[0]
    forward, inverse = dct_matrix(height)

    def without_dc(x):
        coefficients = forward @ x @ forward.T  # 2-D DCT over (H, W)
        coefficients[:, :, 0, 0] = 0
        return inverse @ coefficients @ inverse.T

    frequency = F.mse_loss(F.normalize(without_dc(preds_s), dim=1, p=2), F.normalize(without_dc(preds_t), dim=1, p=2),
                           reduction="sum") / n * alpha[1]
    return spatial, frequency


def randomize(module, seed):
    """Norm layers' weights 1 + N(0, 0.2^2) and biases N(0, 0.5^2), so that they matter; the rest keeps torch's init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                layer.weight.copy_(1 + 0.2 * torch.randn(layer.weight.shape, generator=generator))
                layer.bias.copy_(0.5 * torch.randn(layer.bias.shape, generator=generator))
    return module


def flax_variables(torch_projector) -> dict:
    """The torch projector's parameters and BatchNorm statistics under the Flax projector's names and layouts."""
    t = {key: value.detach().numpy().astype(np.float32) for key, value in torch_projector.state_dict().items()}
    dense = lambda name: {"kernel": t[f"{name}.weight"].T, "bias": t[f"{name}.bias"]}  # noqa: E731
    params = {
        "proj_student_0": {"kernel": t["proj_student.0.weight"].transpose(2, 3, 1, 0), "bias": t["proj_student.0.bias"]},
        "proj_student_1": {"scale": t["proj_student.1.weight"], "bias": t["proj_student.1.bias"]},
        "pos_embed": t["pos_embed"].transpose(0, 2, 3, 1),
        "proj_pos_0": {"kernel": t["proj_pos.0.weight"][:, :, 0, 0].T, "bias": t["proj_pos.0.bias"]},
        "pos_attention": {name: dense(f"pos_attention.{name}") for name in ("q", "k", "v", "proj")},
        "norm": {"scale": t["norm.weight"], "bias": t["norm.bias"]},
        "ffn_0": dense("ffn.0"), "ffn_1": dense("ffn.2"),
    }
    if "query.weight" in t:
        params["query"] = t["query.weight"]
    return {"params": params, "batch_stats": {"proj_student_1": {"mean": t["proj_student.1.running_mean"],
                                                                 "var": t["proj_student.1.running_var"]}}}


@pytest.mark.parametrize("learned_queries", [True, False])
def test_projector_and_dual_view_loss_match_the_official_formulas(learned_queries):
    """One CAP in train mode (batch statistics, running statistics updated as torch's BatchNorm2d) and its two view
    losses against the torch port, on the same random weights: learned queries (stage 3), or given ones (stage 4)."""
    batch, c_s, c_t, side, heads, scale, alpha = 3, 8, 16, 4, 4, 5.0, (0.08, 0.06)
    torch.manual_seed(0)
    reference = randomize(TorchProjector(c_s, c_t, (side, side), heads, scale, learned_queries), seed=1)
    variables = flax_variables(reference)  # before torch's train-mode forward updates the running statistics
    reference = reference.double().train()
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(batch, c_s, side, side, generator=generator, dtype=torch.float64)
    teacher = torch.randn(batch, c_t, side, side, generator=generator, dtype=torch.float64)
    queries = None if learned_queries else torch.randn(batch, side * side, c_t, generator=generator,
                                                       dtype=torch.float64)
    expected = reference(student, queries)
    expected_spatial, expected_frequency = torch_losses(expected, teacher, alpha)

    projector = CrossAttentionProjector(c_t, heads, scale, side * side if learned_queries else 0)
    to_nhwc = lambda x: x.permute(0, 2, 3, 1).numpy().astype(np.float32)  # noqa: E731
    ours, updates = projector.apply(variables, to_nhwc(student), None if queries is None else queries.float().numpy(),
                                    train=True, mutable=["batch_stats"])
    ours_map = np.asarray(ours).reshape(batch, side, side, c_t)
    spatial = alpha[0] * float(spatial_loss(ours_map, to_nhwc(teacher)))
    frequency = alpha[1] * float(frequency_loss(ours_map, to_nhwc(teacher)))

    errors = {"output": float(np.abs(np.asarray(ours) - expected.detach().numpy()).max()
                              / np.abs(expected.detach().numpy()).max()),
              "spatial": abs(spatial - expected_spatial.item()) / abs(expected_spatial.item()),
              "frequency": abs(frequency - expected_frequency.item()) / abs(expected_frequency.item())}
    for name in ("mean", "var"):
        torch_name = {"mean": "running_mean", "var": "running_var"}[name]
        expected_stat = getattr(reference.proj_student[1], torch_name).detach().numpy()
        errors[f"running_{name}"] = float(np.abs(np.asarray(updates["batch_stats"]["proj_student_1"][name])
                                                 - expected_stat).max() / np.abs(expected_stat).max())
    print(f"\nScaleKD projector vs torch (learned queries {learned_queries}): "
          + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    assert max(errors.values()) < 1e-5, errors


def test_frequency_view_is_the_dct_without_its_dc_component():
    """2-D DCT-II (scipy, norm=None), the (0, 0) coefficient zeroed, inverse DCT: each channel minus its spatial
    mean; so the frequency loss is the spatial loss of those maps."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 6, 5, 3)) + 3.0  # (B, H, W, C), a large mean
    coefficients = scipy.fft.dctn(maps, type=2, axes=(1, 2))
    coefficients[:, 0, 0, :] = 0
    without_dc = scipy.fft.idctn(coefficients, type=2, axes=(1, 2))
    np.testing.assert_allclose(without_dc, maps - maps.mean(axis=(1, 2), keepdims=True), atol=1e-12)
    other = rng.normal(size=maps.shape)
    other_coefficients = scipy.fft.dctn(other, type=2, axes=(1, 2))
    other_coefficients[:, 0, 0, :] = 0
    normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    expected = np.sum((normalize(without_dc) - normalize(scipy.fft.idctn(other_coefficients, type=2, axes=(1, 2))))
                      ** 2) / len(maps)
    np.testing.assert_allclose(float(frequency_loss(maps.astype(np.float32), other.astype(np.float32))), expected,
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The method on the tiny Swin teacher.

def tiny_teacher_variables(config, num_classes=TINY_CLASSES, seed=1):
    return trainer.init_variables(teacher_lib.model(config, num_classes), config.data.image_size, seed=seed)


def test_projector_shapes():
    """Stage 3: learned queries on the teacher's 4x4 stage-3 grid, 64 wide; stage 4: given queries, 128 wide; each
    position embedding the student map's size; outputs on the teacher's grid."""
    method = methods.create(tiny_config())
    head, state = method.init_head(jax.random.key(0), 128, None)
    assert set(head) == {"stage3_spatial", "stage3_frequency", "stage4_spatial", "stage4_frequency"}
    assert head["stage3_spatial"]["query"].shape == (16, 64) and "query" not in head["stage4_spatial"]
    assert head["stage3_spatial"]["pos_embed"].shape == (1, 4, 4, 64)  # ResNet-18 x 0.25, layer3 at 64 px
    assert head["stage4_spatial"]["pos_embed"].shape == (1, 2, 2, 128)
    assert head["stage4_spatial"]["pos_attention"]["k"]["kernel"].shape == (128, 128)
    assert state["stage3_frequency"]["proj_student_1"]["var"].shape == (64,)
    stage3 = jax.eval_shape(lambda: method.projectors["stage3_spatial"].apply(
        {"params": head["stage3_spatial"], "batch_stats": state["stage3_spatial"]}, jnp.zeros((2, 4, 4, 64)), None,
        train=False))
    stage4 = jax.eval_shape(lambda: method.projectors["stage4_spatial"].apply(
        {"params": head["stage4_spatial"], "batch_stats": state["stage4_spatial"]}, jnp.zeros((2, 2, 2, 128)),
        jnp.zeros((2, 4, 128)), train=False))
    assert stage3.shape == (2, 16, 64) and stage4.shape == (2, 4, 128)
    no_tpp = methods.create(tiny_config(**{"scalekd.tpp": False})).init_head(jax.random.key(0), 128, None)[0]
    assert set(no_tpp) == {"stage4_spatial", "stage4_frequency"} and no_tpp["stage4_spatial"]["query"].shape == (4, 128)


def changed(before, after) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.slow
def test_teacher_stays_frozen_while_gradients_reach_the_projectors_through_it():
    """Two steps of the trainer's own step, SGD without weight decay or momentum (a parameter moves only where its
    gradient is nonzero): the teacher's variables, a constant of the step and not in the train state, are
    bit-identical afterwards, while every projector moved, the stage-3 ones included, whose only way to the loss
    is through the teacher's last stage, and so did the student's layer3."""
    config = tiny_config()
    method = methods.create(config)
    teacher_variables = tiny_teacher_variables(config)
    before = jax.tree.map(np.array, teacher_variables)
    teacher = teacher_lib.Teacher(teacher_variables, "0" * 64, TINY_CLASSES)
    variables = distill.initial_variables(config, method, teacher, None)
    mesh = parallel.make_mesh(jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 64, 64, 3)).astype(np.float32),
             "label": rng.integers(0, TINY_CLASSES, size=4).astype(np.int32)}
    tx = optim.sgd(optim.step_decay_schedule(0.1, 10, 30, 0.1, 90), 0.0, 0.0)
    state = trainer.create_train_state(variables, tx, mesh, seed=0)
    assert set(state.params) == {"student", "head"}
    constants = parallel.replicate((teacher.variables, None), mesh)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, TINY_CLASSES), tx, mesh)
    for _ in range(2):
        state, metrics = step(state, parallel.shard_batches([batch], mesh, 1), parallel.replicate(np.int32(1), mesh),
                              constants)
        assert np.isfinite(float(metrics["loss"][0]))
    assert set(metrics) == {"loss", "spatial_stage3", "frequency_stage3", "spatial_stage4", "frequency_stage4", "kd",
                            "ce"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(constants[0]), before)
    jax.tree.map(np.testing.assert_array_equal, teacher_variables, before)
    params = jax.device_get(state.params)
    for name in method.projectors:
        assert changed(variables["params"]["head"][name], params["head"][name]), name
    assert changed(variables["params"]["student"]["layer3_0"], params["student"]["layer3_0"])


def test_vit_teacher_queries_on_its_grid_attend_to_a_coarser_student_map():
    """Label-free, from a small ViT teacher (4x4 patch grid at 64 px): the stage-4 projectors' 16 queries (the
    perception's output) attend to the student's 2x2 layer4 map, without interpolation; a finite loss, gradients to
    every projector."""
    vit = dict(image_size=64, patch_size=16, num_layers=4, num_heads=4, hidden_dim=32, mlp_dim=64)
    config = tiny_config(**{"teacher.arch": "vit_b_16", "teacher.overrides": vit, "data.image_size": 64,
                            "scalekd.query_sizes": (4, 4), "scalekd.num_heads": (4, 4), "scalekd.labels": False})
    method = methods.create(config)
    method.check(32, 128, 10)
    assert method.maps["teacher", 4] == (4, 4, 32) and method.maps["student", 4] == (2, 2, 128)
    teacher_variables = tiny_teacher_variables(config, num_classes=10)
    rng = np.random.default_rng(0)
    student = {"stage3": rng.normal(size=(2, 4, 4, 64)), "stage4": rng.normal(size=(2, 2, 2, 128)),
               "logits": rng.normal(size=(2, 10))}
    targets = {"stage4": rng.normal(size=(2, 4, 4, 32)), "logits": rng.normal(size=(2, 10))}
    head, state = method.init_head(jax.random.key(0), 128, None)

    def loss(head):
        return method.loss(head, state, student, targets, LossContext(teacher=teacher_variables, labels=None))[0]

    value, gradients = jax.jit(jax.value_and_grad(loss))(head)
    assert np.isfinite(float(value))
    for name, tree in gradients.items():
        assert float(sum(jnp.abs(leaf).sum() for leaf in jax.tree.leaves(tree))) > 0, name


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """The tiny Swin, randomly initialised with a classifier of the demo's 38 upstream classes, converted."""
    directory = tmp_path_factory.mktemp("scalekd") / "teacher"
    variables = {"batch_stats": {}, **tiny_teacher_variables(tiny_config())}  # a Swin has no BatchNorm, as converted
    convert.save_converted(directory, variables, "swin_t", source="random init, for tests")
    return directory


@pytest.mark.slow
def test_tiny_config_end_to_end(tiny_teacher, tmp_path):
    """No statistics, distillation with every term (labels on), export without the projectors and the classifier."""
    config = tiny_config(**{"teacher.path": str(tiny_teacher)})
    outputs = pipeline.run(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = data.dataset_info(config.data, config.data.split).num_examples // config.train.batch_size
    assert [row["step"] for row in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(row["loss"]) and row["ce"] > 0 and row["spatial_stage3"] > 0 for row in rows)
    for row in rows:  # the loss is the sum of its logged terms
        terms = ("spatial_stage3", "frequency_stage3", "spatial_stage4", "frequency_stage4", "kd", "ce")
        assert math.isclose(row["loss"], sum(row[name] for name in terms), rel_tol=1e-4)
    variables, meta = convert.load_converted(outputs["student"], "resnet18")
    assert meta["num_classes"] is None and set(variables["params"]) == set(
        jax.eval_shape(models.create_model("resnet18", num_classes=None, width=0.25).init,
                       jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"])


def test_inputs_it_cannot_take_are_refused_with_one_message(tiny_teacher, tmp_path):
    def refused(config, *words):
        with pytest.raises(ConfigError) as error:
            methods.create(config).check(128, 128, TINY_CLASSES)
        for word in words:
            assert word in str(error.value), (word, str(error.value))

    refused(tiny_config(**{"teacher.arch": "resnet18", "teacher.overrides": {}}), "only the transformer teachers",
            "config.teacher.arch='resnet18'", "--config.scalekd.tpp=False")
    refused(tiny_config(**{"scalekd.query_sizes": (14, 7)}), "config.scalekd.query_sizes=(14, 7)",
            "4x4 for swin_t at config.data.image_size=64", "--config.scalekd.query_sizes='(4, 2)'")
    refused(tiny_config(**{"scalekd.num_heads": (2, 3)}), "config.scalekd.num_heads=(2, 3)", "128 stage-4 channels")

    # Labels: validation refuses them on a folder of unlabeled images, and on data of other classes.
    folder = tmp_path / "unlabeled" / "train"
    folder.mkdir(parents=True)
    for i, image in enumerate(demo_data.load("upstream_train", 64)[0][:32]):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    unlabeled = tiny_config(**{"teacher.path": str(tiny_teacher), "data.name": "image_folder",
                               "data.data_dir": str(tmp_path / "unlabeled"), "data.split": "train",
                               "data.subset": None})
    with pytest.raises(ConfigError, match="folder of unlabeled images.*--config.scalekd.labels=False"):
        validation.validate(unlabeled, 1, 1, tmp_path / "workdir")
    unlabeled.scalekd.labels = False
    validation.validate(unlabeled, 1, 1, tmp_path / "workdir")
    other_classes = tiny_config(**{"teacher.path": str(tiny_teacher), "data.split": "downstream_train"})
    with pytest.raises(ConfigError, match="teacher's 38 classes.*has 10 classes"):
        validation.validate(other_classes, 1, 1, tmp_path / "workdir")


def test_the_swin_comparison_is_a_valid_run_and_a_one_pixel_stage_is_refused(tmp_path):
    """configs/demo.py:compare_swin (ScaleKD beside KDEP and logit KD) passes the checks of every method's run; at
    32 px the student's layer4 is 1x1, where the frequency view is zero, so a weight on it is refused."""
    demo = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]
    for variant in ("compare_swin", "tiny_compare_swin"):
        config = demo(variant)
        assert "scalekd" in config.compare.methods
        validation.validate(config, 1, 1, tmp_path / variant)
    config = demo("compare_swin")
    config.scalekd.weights = ((0.08, 0.06), (0.08, 0.06))
    with pytest.raises(ConfigError, match=r"student's stage-4 map is 1x1 at config.data.image_size=32.*weight 0"):
        methods.create(override(config, {"mode": "kdep", "method": "scalekd"})).check(256, 256, TINY_CLASSES)
