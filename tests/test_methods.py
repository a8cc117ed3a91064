"""Every distillation method: its loss against an independent reference (torch, or numpy in float64), and each one
end to end (statistics, distillation, export) from a converted teacher on a folder of unlabeled images."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert, data, methods, models, pipeline, report
from kdep_jax.data import demo as demo_data
from kdep_jax import teacher as teacher_lib
from kdep_jax.errors import ConfigError
from conftest import small_kdep_config, tiny_config

RNG = np.random.default_rng(0)
STUDENT_LOGITS = RNG.normal(size=(6, 10)).astype(np.float32) * 3
TEACHER_LOGITS = RNG.normal(size=(6, 10)).astype(np.float32) * 3


def method_loss(name, student, targets, head=None, head_state=None, **overrides):
    method = methods.create(small_kdep_config(method=name, **overrides))
    loss, state, _ = method.loss(head or {}, head_state or {}, student, jnp.asarray(targets))
    return float(loss), state


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_kd_is_hintons_kl(temperature):
    expected = temperature**2 * F.kl_div(F.log_softmax(torch.from_numpy(STUDENT_LOGITS) / temperature, 1),
                                         F.softmax(torch.from_numpy(TEACHER_LOGITS) / temperature, 1),
                                         reduction="batchmean")
    loss, _ = method_loss("logit_kd", {"logits": STUDENT_LOGITS}, TEACHER_LOGITS,
                          **{"logit_kd.temperature": temperature})
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def test_ssld_is_paddleclas_symmetric_kl():
    p_s, p_t = (np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
                for z in (STUDENT_LOGITS.astype(np.float64), TEACHER_LOGITS.astype(np.float64)))
    eps = 1e-12
    kl = lambda p, q: np.sum(p * np.log((p + eps) / (q + eps)), axis=1)  # noqa: E731
    expected = np.mean(0.5 * (kl(p_t, p_s) + kl(p_s, p_t)))
    loss, _ = method_loss("ssld", {"logits": STUDENT_LOGITS}, TEACHER_LOGITS)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_ssld_ce_is_soft_label_cross_entropy():
    expected = F.cross_entropy(torch.from_numpy(STUDENT_LOGITS), F.softmax(torch.from_numpy(TEACHER_LOGITS), 1))
    loss, _ = method_loss("ssld_ce", {"logits": STUDENT_LOGITS}, TEACHER_LOGITS)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def test_function_matching_mixes_one_batch_with_its_roll_and_matches_kl():
    method = methods.create(small_kdep_config(method="fm"))
    images = RNG.normal(size=(4, 8, 8, 3)).astype(np.float32)
    coefficients = []
    for seed in range(400):
        mixed = np.asarray(method.inputs(jnp.asarray(images), jax.random.key(seed)), np.float64)
        rolled = np.roll(images, 1, axis=0).astype(np.float64)
        a = np.sum((mixed - rolled) * (images - rolled)) / np.sum((images - rolled) ** 2)  # one a for the batch
        np.testing.assert_allclose(mixed, a * images + (1 - a) * rolled, atol=1e-5)
        coefficients.append(a)
    # a ~ Beta(1, 1) folded onto [0.5, 1]: uniform there (mean 0.75, std 0.144).
    assert min(coefficients) >= 0.5 - 1e-6 and max(coefficients) <= 1 + 1e-6
    assert abs(np.mean(coefficients) - 0.75) < 3 * 0.144 / np.sqrt(400)
    expected = F.kl_div(F.log_softmax(torch.from_numpy(STUDENT_LOGITS), 1),
                        F.softmax(torch.from_numpy(TEACHER_LOGITS), 1), reduction="batchmean")
    loss, _ = method_loss("fm", {"logits": STUDENT_LOGITS}, TEACHER_LOGITS)
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def _alignment(dim):
    components = np.linalg.qr(RNG.normal(size=(dim, dim)))[0]
    return alignment_lib.Alignment(mean=RNG.normal(size=dim), components=components,
                                   singular_values=np.linspace(2, 1, dim), count=10)


def test_kdep_without_pts_targets_are_the_aligned_coordinates():
    method = methods.create(small_kdep_config(method="kdep_no_pts"))
    alignment = _alignment(512)
    features = RNG.normal(size=(5, 512)).astype(np.float32)
    expected = (features.astype(np.float64) - alignment.mean) @ alignment.components[:, :128]
    targets = method.targets({"pre_relu": jnp.asarray(features)}, method.constants(alignment))
    np.testing.assert_allclose(np.asarray(targets), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,overrides,target_dim", [("kdep", {"student.projection": True}, 128),
                                                        ("kdep_conv", {}, 512)])
def test_learned_maps_follow_the_regression_formula(name, overrides, target_dim):
    """KDEP's projection head and the paper's regressor baseline: w * mean((f_s W + b - t)**2), W a learned linear map
    from the student's feature width (128) to the target width."""
    method = methods.create(small_kdep_config(method=name, **overrides))
    head, _ = method.init_head(jax.random.key(0), 128, None)
    kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    assert kernel.shape == (128, target_dim) and np.abs(bias).max() <= 1 / np.sqrt(128)  # torch.nn.Linear's init
    features = RNG.normal(size=(5, 128)).astype(np.float32)
    targets = RNG.normal(size=(5, target_dim)).astype(np.float32)
    loss, _ = method_loss(name, {"pre_relu": features}, targets, head=head, **overrides)
    expected = 20.0 * np.mean((features @ kernel + bias - targets) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_tcs_loss_is_the_masked_mean_squared_error_and_selection_drops_the_largest():
    config = small_kdep_config(method="tcs", **{"tcs.prune_start_epoch": 0.0})
    method = methods.create(config)
    head, state = method.init_head(jax.random.key(0), 128, None)
    assert method.dim == 128 and state["mask"].shape == (128,)
    mask = np.ones(128, np.float32)
    mask[:8] = 0.0
    accumulated = RNG.uniform(size=128).astype(np.float32)
    start, every = method.pruning_steps
    assert start == 0
    state = {"mask": mask, "accumulated": accumulated, "step": np.asarray(every - 1, np.int32)}
    features = RNG.normal(size=(5, 128)).astype(np.float32)
    targets = RNG.normal(size=(5, 128)).astype(np.float32)
    loss, new_state = method_loss("tcs", {"pre_relu": features}, targets, head=head, head_state=state,
                                  **{"tcs.prune_start_epoch": 0.0})
    predicted = features @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    errors = np.mean((predicted - targets) ** 2, axis=0)
    np.testing.assert_allclose(loss, np.sum(mask * errors) / mask.sum(), rtol=1e-5)
    # This step prunes: |dL/dm_j| = errors_j / 120 accumulates on the 120 kept coordinates, then the 30 (25%) with
    # the largest accumulation are removed and the accumulation restarts.
    total = accumulated + mask * errors / mask.sum()
    largest = np.argsort(-np.where(mask > 0, total, -np.inf))[:30]
    expected_mask = mask.copy()
    expected_mask[largest] = 0.0
    np.testing.assert_array_equal(new_state["mask"], expected_mask)
    assert not np.any(new_state["accumulated"]) and int(new_state["step"]) == every


def test_unknown_method_and_logits_from_a_headless_teacher_are_refused():
    with pytest.raises(ConfigError, match="config.method='kdpe' is not a method; known methods: kdep, kdep_no_pts"):
        methods.create(small_kdep_config(method="kdpe"))
    with pytest.raises(ConfigError, match="converted without its classifier"):
        methods.create(small_kdep_config(method="ssld")).check(128, 128, None)


@pytest.fixture(scope="module")
def teacher_and_images(tmp_path_factory):
    """A tiny trained teacher (with its 38-class classifier) and the demo's upstream images as a plain folder of
    PNGs, with no class sub-folders."""
    root = tmp_path_factory.mktemp("methods")
    config = tiny_config(downstream=None, **{"teacher.width": 0.25, "teacher.train.model.width": 0.25,
                                             "student.width": 0.25})
    pipeline.run(config, root / "teacher_run")
    images, _ = demo_data.load("upstream_train", 32)
    folder = root / "unlabeled" / "train"
    folder.mkdir(parents=True)
    for i, image in enumerate(images[:96]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root / "teacher_run" / "teacher" / "model", root / "unlabeled", root


@pytest.mark.slow
# ScaleKD needs a transformer teacher: tests/test_scalekd.py runs it end to end.
@pytest.mark.parametrize("name", [name for name in methods.METHODS if name != "scalekd"])
def test_each_method_distils_from_unlabeled_images(name, teacher_and_images):
    teacher, unlabeled, root = teacher_and_images
    config = tiny_config("tiny_distill", method=name, **{
        "teacher.path": str(teacher), "teacher.width": 0.25, "student.width": 0.25, "data.name": "image_folder",
        "data.data_dir": str(unlabeled), "data.split": "train", "data.subset": None, "alignment.batch_size": 32,
        "tcs.dim": 32, "tcs.prune_start_epoch": 0.0, "tcs.prune_every_epochs": 0.34})
    workdir = root / name
    outputs = pipeline.run(config, workdir)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)
    variables, meta = convert.load_converted(outputs["student"], "resnet18")
    assert meta["num_classes"] is None  # the method's head and any pre-training classifier are not exported
    reference, _ = convert.load_converted(root / "teacher_run" / "student", "resnet18")
    assert set(variables["params"]) == set(reference["params"])
    if name == "tcs":
        assert [row["kept_coordinates"] for row in rows] == [32, 24, 18]  # a quarter of the kept ones, every step
        table = np.load(workdir / "tcs_coordinates.npz")["coordinates"]
        check_tcs_coordinates(config, table)


def check_tcs_coordinates(config, table):
    """The per-example table is each example's whitened top-k PCA coordinates of the teacher's un-augmented features."""
    teacher = teacher_lib.load(config, config.teacher.path)
    outputs = jax.jit(teacher_lib.outputs_fn(config, ("pre_relu",)))
    features = np.concatenate([np.asarray(outputs(teacher.variables, batch["image"])["pre_relu"])[batch["mask"]]
                               for batch in data.eval_batches(config.data, "train", 32)]).astype(np.float64)
    centred = features - features.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:32].T / (s[:32] / np.sqrt(len(features) - 1))
    signs = np.sign(np.sum(table * expected, axis=0))  # each direction's sign is a convention
    np.testing.assert_allclose(table * signs, expected, atol=2e-3 * np.abs(expected).max())


class NoFeatures(nn.Module):
    """A user's module that returns only logits: refused with a message saying what to return."""
    num_classes: int | None = 1000
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x.mean(axis=(1, 2)))


@pytest.mark.slow
def test_a_users_own_student_and_a_wider_projected_student_distil(teacher_and_images):
    """examples/custom_student.py (256-d, twice the teacher's width, so with KDEP's learned projection onto the
    teacher's directions) through the tiny distillation: no PyTorch form, its Flax one is exported; and a ResNet-18
    twice as wide as the teacher the same way."""
    teacher, _, root = teacher_and_images
    common = {"teacher.path": str(teacher), "teacher.width": 0.25, "data.subset": 2}
    outputs = pipeline.run(tiny_config("tiny_distill", **common, **{"student.arch": "examples.custom_student:TinyNet",
                                                                   "student.projection": True}), root / "custom")
    assert set(outputs) == {"workdir", "student"}
    variables, meta = convert.load_converted(outputs["student"], "examples.custom_student:TinyNet")
    assert meta["num_classes"] is None and "Conv_3" in variables["params"]
    pipeline.run(tiny_config("tiny_distill", **common, **{"student.width": 0.5, "student.projection": True}),
                 root / "projected")
    rows = [json.loads(line) for line in (root / "projected" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(row["loss"]) for row in rows)


@pytest.mark.parametrize("arch,message", [
    ("examples.no_such_module:Net", "cannot import examples.no_such_module"),
    ("examples.custom_student:Missing", "has no Flax module 'Missing'"),
    ("test_methods:NoFeatures", r"must return \(logits, features\)"),
])
def test_a_bad_student_module_is_named_and_nothing_is_written(arch, message, tmp_path):
    config = tiny_config(**{"student.arch": arch, "downstream.model.arch": arch})
    with pytest.raises(ConfigError, match=f"config.student.arch='{arch}'.*{message}"):
        pipeline.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_teacher_gets_its_own_normalisation():
    """EfficientNet-Lite's TensorFlow weights expect (x - 127) / 128 of the pixels, not ImageNet's mean/std."""
    pixels = RNG.uniform(0, 255, size=(2, 4, 4, 3)).astype(np.float32)
    imagenet = (pixels / 255 - np.asarray(data.IMAGENET_MEAN)) / np.asarray(data.IMAGENET_STD)
    own = models.preprocessing.to_own_normalisation(jnp.asarray(imagenet, jnp.float32),
                                                    models.EfficientNetLite.preprocessing)
    np.testing.assert_allclose(np.asarray(own), (pixels - 127) / 128, atol=1e-5)
    assert models.preprocessing.to_own_normalisation(imagenet, models.ResNet.preprocessing) is imagenet


def test_the_comparison_table_has_a_row_per_method_and_scratch():
    rows = [{"method": "kdep", "top1": 70.0}, {"method": "kdep", "top1": 72.0}, {"method": "scratch", "top1": 50.0}]
    table = report.comparison_table(rows, {"kdep": {"seconds": 90.0, "images": 1280}})
    assert table.splitlines() == [
        "| method | pre-training wall time | images seen | downstream top-1 (mean ± std over seeds) |",
        "|---|---:|---:|---:|",
        "| kdep | 1.5 min | 1,280 | 71.00 ± 1.41 (n=2) |",
        "| scratch | – | – | 50.00 (n=1) |",
    ]


def test_each_method_of_a_comparison_distils_from_the_shared_teacher():
    """The demo's comparison trains its teacher once; each method's run then reads it from the given path."""
    config = tiny_config("compare")
    assert config.teacher.train is not None
    per_method = pipeline.method_config(config, "ssld", "runs/compare/teacher/model")
    assert (per_method.mode, per_method.method, per_method.teacher.path, per_method.teacher.checkpoint,
            per_method.teacher.train, per_method.downstream) == ("kdep", "ssld", "runs/compare/teacher/model", "",
                                                                  None, None)
    assert config.teacher.train is not None and config.method == "kdep"  # the comparison's own config is kept


@pytest.mark.slow
def test_the_comparison_run(teacher_and_images):
    """configs/demo.py:tiny_compare from a converted teacher: one student per method, each fine-tuned with two seeds,
    scratch beside them, one results row per (init, seed) and the table."""
    teacher, _, root = teacher_and_images
    config = tiny_config("tiny_compare", **{"teacher.train": None, "teacher.path": str(teacher), "teacher.width": 0.25,
                                            "student.width": 0.25, "downstream.model.width": 0.25,
                                            "compare.methods": "kdep,logit_kd", "compare.seeds": "0,1"})
    outputs = pipeline.run(config, root / "compare")
    assert [(row["method"], row["seed"]) for row in outputs["results"]] == [
        (method, seed) for method in ("kdep", "logit_kd", "scratch") for seed in (0, 1)]
    table = (root / "compare" / "comparison.md").read_text().splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in table[2:]] == ["kdep", "logit_kd", "scratch"]
    assert json.loads((root / "compare" / "kdep" / "pretraining.json").read_text())["seconds"] > 0
