"""The teacher-target cache: recorded targets are the online ones for the same crops, and replay checks the
examples and crops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdep_jax import alignment as alignment_lib
from kdep_jax import data, distill, methods, models, parallel, target_cache, trainer
from kdep_jax import teacher as teacher_lib
from conftest import IMAGE_SIZE, small_kdep_config

NUM_STEPS = 3


def small_config():
    config = small_kdep_config(**{"teacher.arch": "resnet18", "train.batch_size": 8, "target_cache.enabled": True})
    config.data.update(subset=2, min_crop_scale=0.35)  # 76 demo images
    return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = small_config()
    mesh = parallel.make_mesh()
    method = methods.create(config)
    rng = np.random.default_rng(0)
    teacher_variables = trainer.init_variables(teacher_lib.model(config), IMAGE_SIZE, seed=1)
    teacher_variables = jax.tree_util.tree_map_with_path(  # non-trivial running statistics
        lambda path, x: (x + rng.uniform(0.1, 0.5, x.shape).astype(x.dtype)) if "var" in jax.tree_util.keystr(path)
        else x, teacher_variables)
    teacher_dim = models.feature_dim("resnet18", 0.25)
    alignment = alignment_lib.Alignment(
        mean=rng.normal(size=teacher_dim).astype(np.float32),
        components=np.linalg.qr(rng.normal(size=(teacher_dim, teacher_dim)))[0].astype(np.float32),
        singular_values=np.ones(teacher_dim, np.float32), count=100)
    teacher = teacher_lib.Teacher(teacher_variables, "0" * 64, None)
    directory = tmp_path_factory.mktemp("cache")
    cache = distill.target_cache_for(config, directory, mesh, teacher, method, method.constants(alignment), NUM_STEPS)
    return config, mesh, teacher, method, alignment, directory, cache


def online_targets(config, teacher, alignment, dim, images):
    _, features = teacher_lib.model(config).apply(teacher.variables, images, train=False)
    return np.asarray(alignment_lib.teacher_targets(features["pre_relu"], alignment, dim))


def test_cached_targets_equal_online_targets_for_the_same_crops(built):
    config, mesh, teacher, method, alignment, directory, cache = built
    dim = method.dim
    assert cache.targets.shape == (NUM_STEPS, 8, dim) and cache.targets.dtype == np.float16
    batches = data.train_batches(config.data, config.data.split, 8, seed=config.seed, with_crops=True)
    for step in range(NUM_STEPS):
        batch = next(batches)
        np.testing.assert_array_equal(cache.crops[step][:, 0], batch["index"])
        np.testing.assert_array_equal(cache.crops[step][:, 1:], batch["crop"])
        expected = online_targets(config, teacher, alignment, dim, batch["image"])
        # float16 keeps 11 significant bits: within 2**-11 of each value.
        np.testing.assert_allclose(cache.targets[step].astype(np.float32), expected, rtol=2**-11, atol=1e-6)
    crops = np.asarray(cache.crops)
    assert set(np.unique(crops[..., 5])) <= {0, 1} and (crops[..., 3:5] >= 1).all()


def test_replayed_batches_bring_the_targets_and_the_loss_matches(built):
    config, mesh, teacher, method, alignment, directory, cache = built
    replayed = target_cache.replay(
        data.train_batches(config.data, config.data.split, 8, seed=config.seed, start_step=1, with_crops=True),
        cache, start_step=1)
    batch = next(replayed)
    assert set(batch) == {"image", "label", "targets"}
    np.testing.assert_array_equal(batch["targets"], cache.targets[1])
    variables = distill.initial_variables(config, method, teacher, alignment)
    key = jax.random.key(0)
    online = distill.make_loss_fn(config, method, None)(
        variables["params"], variables["batch_stats"], {"image": batch["image"]},
        (teacher.variables, method.constants(alignment)), key)[0]
    cached = distill.make_loss_fn(config, method, None, cached_targets=True)(
        variables["params"], variables["batch_stats"],
        {"image": batch["image"], "targets": jnp.asarray(batch["targets"])}, (), key)[0]
    np.testing.assert_allclose(float(cached), float(online), rtol=1e-3)


def test_cache_is_reused_only_for_the_same_run(built, caplog):
    config, mesh, teacher, method, alignment, directory, cache = built
    dim = method.dim
    wanted = target_cache.provenance(
        config, {**teacher_lib.data_provenance(config, teacher, config.data), **method.provenance()}, dim, NUM_STEPS)
    assert target_cache.load(target_cache.cache_dir(config, directory), wanted) is not None
    assert target_cache.load(target_cache.cache_dir(config, directory), {**wanted, "batch_size": 16}) is None
    assert "batch_size" in caplog.text


def test_replay_refuses_other_crops(built):
    config, mesh, teacher, method, alignment, directory, cache = built
    other_seed = data.train_batches(config.data, config.data.split, 8, seed=config.seed + 1, with_crops=True)
    with pytest.raises(ValueError, match="crop and flip .* so its targets belong to other images"):
        next(target_cache.replay(other_seed, cache, start_step=0))


def test_replay_refuses_another_example_under_the_same_crop(built):
    config, mesh, teacher, method, alignment, directory, cache = built
    crops = np.array(cache.crops)
    crops[0, 3, 0] += 1  # the recorded example of row 3, not its crop
    tampered = target_cache.TargetCache(crops, cache.targets)
    batches = data.train_batches(config.data, config.data.split, 8, seed=config.seed, with_crops=True)
    with pytest.raises(ValueError, match=f"Step 0, row 3: the input pipeline gives example {crops[0, 3, 0] - 1} "):
        next(target_cache.replay(batches, tampered, start_step=0))
