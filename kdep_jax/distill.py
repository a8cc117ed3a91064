"""KDEP: the alignment statistics of the frozen teacher, then feature distillation into the student."""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
from etils import epath
from tqdm.auto import tqdm

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert, data, faults, losses, models, parallel, target_cache, trainer
from kdep_jax.errors import ConfigError


def teacher_model(config):
    return models.create_model(config.teacher.arch, num_classes=None, dtype=jnp.dtype(config.dtype),
                               width=config.teacher.width)


def teacher_features_fn(config):
    """(teacher variables, images) -> the teacher's pooled pre-ReLU features, float32, eval-mode BatchNorm."""
    teacher = teacher_model(config)
    return lambda variables, images: teacher.apply(variables, images, train=False)[1]["pre_relu"].astype(jnp.float32)


def teacher_targets_fn(config, dim: int):
    """(teacher variables, alignment, images) -> the KDEP targets: aligned to the top `dim` directions, PTS."""
    features_of = teacher_features_fn(config)

    def targets_of(teacher_variables, alignment, images):
        return alignment_lib.teacher_targets(features_of(teacher_variables, images), alignment, dim,
                                             pts_t=config.alignment.pts_t, pts_n=config.alignment.pts_n)

    return targets_of


def student_model(config):
    return models.create_model(config.student.arch, num_classes=None, dtype=jnp.dtype(config.dtype),
                               width=config.student.width)


def student_dim(config) -> int:
    """The target width k: the student's feature width, which must not exceed the teacher's."""
    k = models.feature_dim(config.student.arch, config.student.width)
    teacher_dim = models.feature_dim(config.teacher.arch, config.teacher.width)
    if k > teacher_dim:
        raise ConfigError(f"The student {config.student.arch} (width {config.student.width}) has {k}-d features, more "
                         f"than the teacher {config.teacher.arch}'s {teacher_dim}: KDEP aligns the student to the "
                         f"teacher's top-k principal directions, so k cannot exceed the teacher's width. Choose a "
                         f"wider teacher or a narrower student.")
    return k


def load_teacher(config, teacher_dir):
    """The frozen teacher's variables and the content hash that ties the alignment statistics to it.

    `validation.validate` has checked that the directory holds a converted teacher of this arch.
    """
    variables, meta = convert.load_converted(teacher_dir, config.teacher.arch)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}, meta["sha256"]


def alignment_data(config):
    """The statistics' data: the distillation data unless the config names other data."""
    return config.alignment.data if config.alignment.data is not None else config.data


def alignment_provenance(config, teacher_sha256: str) -> dict:
    """What the statistics depend on; a file whose provenance differs is not reused.

    Every data setting (which images, how they are cropped, which corrupt ones are left out), the seed of
    the augmentation and the compute dtype; only the reader's thread count is left out, it changes no value.
    """
    stats_data = alignment_data(config).to_dict()
    stats_data.pop("threads")
    return {"teacher_sha256": teacher_sha256, "teacher_arch": config.teacher.arch,
            "teacher_width": config.teacher.width, "data": stats_data, "seed": config.seed, "dtype": config.dtype}


def compute_or_load_alignment(config, workdir, mesh, teacher_variables, teacher_sha256: str):
    """Reuses the statistics file when it was made by this teacher on this data, else recomputes it."""
    path = epath.Path(config.alignment.path or epath.Path(workdir) / "alignment.npz")
    wanted = json.loads(json.dumps(alignment_provenance(config, teacher_sha256)))  # as the file records it
    if path.exists():
        alignment, provenance = alignment_lib.load_alignment(path)
        made_by = {key: provenance.get(key) for key in wanted}
        if made_by == wanted:
            logging.info("Reusing the alignment statistics in %s (%d features).", path, alignment.count)
            return alignment
        differences = ", ".join(_differences(made_by, wanted))
        logging.warning("The alignment statistics in %s were made for another teacher or data (%s); recomputing "
                        "them.", path, differences)
    alignment = fit_teacher_alignment(config, mesh, teacher_variables)
    if jax.process_index() == 0:
        alignment_lib.save_alignment(path, alignment, {**wanted, "count": int(alignment.count)})
    logging.info("Alignment statistics from %d teacher features saved to %s.", alignment.count, path)
    return alignment


def _differences(there: dict, now: dict, prefix: str = ""):
    for key in now:
        if isinstance(now[key], dict) and isinstance(there.get(key), dict):
            yield from _differences(there[key], now[key], f"{prefix}{key}.")
        elif there.get(key) != now[key]:
            yield f"{prefix}{key}: {there.get(key)!r} there, {now[key]!r} now"


def fit_teacher_alignment(config, mesh, teacher_variables):
    """One pass of the frozen teacher over the distillation data, with the training augmentation."""
    teacher_features = jax.jit(teacher_features_fn(config),
                               in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
                               out_shardings=parallel.batch_sharding(mesh))

    variables = parallel.replicate(teacher_variables, mesh)
    batch_size = config.alignment.batch_size
    stats_data = alignment_data(config)
    info = data.dataset_info(stats_data, stats_data.split)
    progress = tqdm(total=info.num_examples, desc="alignment statistics", unit="img", unit_scale=True,
                    disable=jax.process_index() != 0, dynamic_ncols=True)

    def features_and_masks():
        for batch in data.eval_batches(stats_data, stats_data.split, batch_size, augment_seed=config.seed + 1):
            batch = parallel.shard_batch(batch, mesh)
            yield teacher_features(variables, batch["image"]), batch["mask"]
            progress.update(batch_size)
            faults.point("alignment.batch")

    try:
        return alignment_lib.fit_alignment(features_and_masks())
    finally:
        progress.close()


def make_loss_fn(config, dim: int, cached_targets: bool = False):
    """The KDEP loss of one batch; with cached_targets the batch brings its "targets" and the teacher is not run."""
    student, targets_of = student_model(config), teacher_targets_fn(config, dim)

    def loss_fn(params, batch_stats, batch, constants, rng):
        if cached_targets:
            targets = batch["targets"].astype(jnp.float32)
        else:
            teacher_variables, alignment = constants
            targets = targets_of(teacher_variables, alignment, batch["image"])
        (_, student_features), updates = student.apply({"params": params, "batch_stats": batch_stats},
                                                        batch["image"], train=True, mutable=["batch_stats"])
        loss = losses.feature_distillation_loss(student_features["pre_relu"], jax.lax.stop_gradient(targets),
                                                config.train.loss_weight)
        return loss, (updates["batch_stats"], {})

    return loss_fn


def distill(config, workdir, mesh, teacher_variables, alignment, teacher_sha256: str) -> trainer.FitResult:
    """Trains the student to the teacher's aligned, PTS-scaled features (or resumes doing so).

    With config.target_cache.enabled the teacher runs once, over the whole schedule, into a cache (reused
    when it matches), and the training steps read its targets instead.
    """
    dim = student_dim(config)
    info = data.dataset_info(config.data, config.data.split)
    steps_per_epoch, schedule, tx = trainer.sgd_recipe(config, info.num_examples)
    student = student_model(config)
    state = trainer.create_train_state(trainer.init_variables(student, config.data.image_size, config.seed), tx, mesh,
                                       config.seed)
    # Only the first k directions are used: a (D, k) slice keeps the replicated constant small.
    compact = alignment_lib.Alignment(mean=alignment.mean.astype("float32"),
                                      components=alignment.components[:, :dim].astype("float32"),
                                      singular_values=alignment.singular_values[:dim].astype("float32"),
                                      count=alignment.count)
    settings = trainer.loop_settings(config, "distill", steps_per_epoch)
    logging.info("Distilling %s (%d-d) into %s (%d-d, %d parameters): %d steps of %d images.", config.teacher.arch,
                 models.feature_dim(config.teacher.arch, config.teacher.width), config.student.arch, dim,
                 trainer.count_params(state.params), settings.num_steps, config.train.batch_size)

    def pipeline_batches(start, with_crops=False):
        return data.train_batches(config.data, config.data.split, config.train.batch_size, seed=config.seed,
                                  start_step=start, with_crops=with_crops)

    if config.target_cache.enabled:
        cache = target_cache_for(config, workdir, mesh, teacher_variables, compact, dim, teacher_sha256,
                                 settings.num_steps)
        constants = ()
        batches = lambda start: target_cache.replay(pipeline_batches(start, with_crops=True), cache, start)
    else:
        constants = parallel.replicate((teacher_variables, compact), mesh)
        batches = pipeline_batches
    loss_fn = make_loss_fn(config, dim, cached_targets=config.target_cache.enabled)
    return trainer.fit(
        workdir=workdir, settings=settings, state=state, train_step=trainer.make_train_step(loss_fn, tx, mesh),
        constants=constants, batches=batches, mesh=mesh, lr_schedule=schedule)


def target_cache_for(config, workdir, mesh, teacher_variables, alignment, dim: int, teacher_sha256: str,
                     num_steps: int) -> target_cache.TargetCache:
    """The cache of this run's targets: reused when it was made for the same teacher, data and schedule."""
    directory = target_cache.cache_dir(config, workdir)
    wanted = target_cache.provenance(config, alignment_provenance(config, teacher_sha256), dim, num_steps)
    cache = target_cache.load(directory, wanted)
    if cache is not None:
        logging.info("Reusing the teacher-target cache in %s.", directory)
        return cache
    return target_cache.build(config, directory, mesh, teacher_targets_fn(config, dim), teacher_variables, alignment,
                              wanted)
