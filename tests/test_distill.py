"""The distillation step: the same on 1 and 4 devices, the teacher untouched, the loss as DESIGN.md states it."""
import os

import jax
import numpy as np
import pytest

from kdep_jax import alignment as alignment_lib
from kdep_jax import distill, methods, models, optim, parallel, trainer
from kdep_jax import teacher as teacher_lib
from kdep_jax.errors import ConfigError
from conftest import IMAGE_SIZE, small_kdep_config


@pytest.fixture(scope="module")
def setup():
    config = small_kdep_config()
    method = methods.create(config)
    teacher_variables = trainer.init_variables(teacher_lib.model(config), IMAGE_SIZE, seed=1)
    # Non-trivial running statistics, so that eval-mode BatchNorm really uses them.
    rng = np.random.default_rng(0)
    teacher_variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (x + rng.uniform(0.1, 0.5, x.shape).astype(x.dtype)) if "var" in jax.tree_util.keystr(path)
        else x, teacher_variables)
    teacher = teacher_lib.Teacher(teacher_variables, "0" * 64, None)
    teacher_dim = models.feature_dim("resnet50", 0.25)
    components = np.linalg.qr(rng.normal(size=(teacher_dim, teacher_dim)))[0]
    alignment = alignment_lib.Alignment(mean=rng.normal(size=teacher_dim).astype(np.float32),
                                        components=components.astype(np.float32),
                                        singular_values=np.ones(teacher_dim, np.float32), count=100)
    variables = distill.initial_variables(config, method, teacher, alignment)
    images = rng.normal(size=(8, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return config, method, teacher, alignment, variables, images


def run_steps(setup, num_devices, num_steps=2):
    config, method, teacher, alignment, variables, images = setup
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    tx = optim.sgd(optim.step_decay_schedule(0.1, 10, 30, 0.1, 90), 0.9, 5e-4)
    state = trainer.create_train_state(variables, tx, mesh, seed=0)
    constants = parallel.replicate((teacher.variables, method.constants(alignment)), mesh)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, None), tx, mesh)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, parallel.shard_batches([{"image": images}], mesh, 1),
                              parallel.replicate(np.int32(1), mesh), constants)
        losses.append(float(metrics["loss"][0]))
    return jax.device_get(state), losses, jax.device_get(constants[0])


@pytest.fixture(scope="module")
def runs(setup):
    return {num_devices: run_steps(setup, num_devices) for num_devices in (1, 4)}


def relative_error(a, b) -> float:
    """Largest difference over the largest magnitude, per tree (the parity measure used throughout)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / max(float(np.max(np.abs(y))) for y in b)


def test_step_on_four_devices_equals_one_device(runs):
    (state_1, losses_1, _), (state_4, losses_4, _) = runs[1], runs[4]
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5)
    assert relative_error(state_4.params, state_1.params) < 1e-5
    # The momentum trace is the sum of raw gradients, whose summation order differs between 1 and 4
    # devices: a few float32 ulps of the largest gradient, so 1e-4 here; the parameters above stay at 1e-5.
    assert relative_error(state_4.opt_state, state_1.opt_state) < 1e-4
    # Synchronised BatchNorm: the running statistics are those of the global batch on both.
    assert relative_error(state_4.batch_stats, state_1.batch_stats) < 1e-5


def test_teacher_is_frozen_and_loss_follows_the_formula(setup, runs):
    config, method, teacher, alignment, variables, images = setup
    state, losses, teacher_after = runs[4]
    for a, b in zip(jax.tree.leaves(teacher_after), jax.tree.leaves(teacher.variables)):
        np.testing.assert_array_equal(a, b)
    # The first step's loss, recomputed in float64 numpy from the two networks' features.
    dim = method.dim
    f_t = np.asarray(teacher_lib.model(config).apply(teacher.variables, images, train=False)[1]["pre_relu"],
                     np.float64)
    student_variables = {"params": variables["params"]["student"], "batch_stats": variables["batch_stats"]["student"]}
    (_, student_features), _ = distill.student_model(config).apply(student_variables, images, train=True,
                                                                   mutable=["batch_stats"])
    f_s = np.asarray(student_features["pre_relu"], np.float64)
    z = (f_t - alignment.mean) @ np.asarray(alignment.components, np.float64)[:, :dim]
    targets = np.sign(z) * np.abs(z / 0.1) ** (1 / 3)
    expected = config.train.loss_weight * np.mean((f_s - targets) ** 2)
    np.testing.assert_allclose(losses[0], expected, rtol=1e-4)
    assert losses[-1] < losses[0]


def test_student_wider_than_teacher_is_refused_with_a_way_forward():
    config = small_kdep_config()
    config.student.update(arch="mobilenet_v2", width=1.0)  # 1280-d against the teacher's 512
    with pytest.raises(ConfigError, match="1280-d features, more than the teacher resnet50's 512.*"
                                          "--config.student.projection=True"):
        methods.create(config).check(512, 1280, None)
    config.student.projection = True
    methods.create(config).check(512, 1280, None)


def test_bfloat16_loss_is_within_1e2_of_float32(setup):
    """bfloat16 convolutions, float32 parameters, statistics and loss: the loss moves by well under 1%."""
    _, method, teacher, alignment, variables, images = setup
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = small_kdep_config(dtype=dtype)
        loss_fn = jax.jit(distill.make_loss_fn(config, methods.create(config), None))
        loss, _ = loss_fn(variables["params"], variables["batch_stats"], {"image": images},
                          (teacher.variables, method.constants(alignment)), jax.random.key(0))
        losses[dtype] = float(loss)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from Linux's /proc")
def test_release_freed_host_memory_returns_the_compilers_heap():
    """After compiling a training step, the compiler's freed heap goes back to the OS (the trainer calls this once
    its step is compiled): compiling ResNet-18's backward pass leaves about 140 MiB of it here."""
    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    model = models.create_model("resnet18", num_classes=10)
    variables = trainer.init_variables(model, 32, 0)

    def loss(params, images):
        (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                     train=True, mutable=["batch_stats"])
        return logits.sum()

    jax.jit(jax.grad(loss)).lower(variables["params"], np.zeros((2, 32, 32, 3), np.float32)).compile()
    before = resident_mib()
    trainer.release_freed_host_memory()
    assert resident_mib() < before - 30
