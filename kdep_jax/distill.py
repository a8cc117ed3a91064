"""The distillation trainer, one for every method: the method's statistics, then the student (and the
method's head) trained to the frozen teacher's targets, from the teacher online or from the target cache.

The train state holds {"student": ..., "head": ...} in both `params` and `batch_stats` (the head's
non-trainable state); only the student is exported.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from kdep_jax import data, faults, methods, models, parallel, target_cache, trainer
from kdep_jax import teacher as teacher_lib


def student_model(config, num_classes: int | None = None):
    return models.from_config(config.student, num_classes=num_classes, dtype=jnp.dtype(config.dtype))


def student_classes(method: methods.Method, teacher: teacher_lib.Teacher) -> int | None:
    """The student's pre-training classifier: as wide as the teacher's for logit methods, none otherwise."""
    return teacher.num_classes if method.student_logits else None


def make_loss_fn(config, method: methods.Method, teacher_classes: int | None, cached_targets: bool = False):
    """The distillation loss of one batch: loss_fn(params, batch_stats, batch, constants, rng) for trainer.fit.

    constants: (teacher variables, the method's constants); with cached_targets the batch brings its
    "targets" and the teacher is not run. The method's loss gets a LossContext: the teacher's variables (None with
    cached targets) and the batch's labels.
    """
    student = student_model(config, teacher_classes if method.student_logits else None)
    teacher_outputs = teacher_lib.outputs_fn(config, method.teacher_outputs, teacher_classes)

    def loss_fn(params, batch_stats, batch, constants, rng):
        inputs_rng, dropout_rng = jax.random.split(rng)
        images = method.inputs(batch["image"], inputs_rng)
        if cached_targets:
            teacher_variables, targets = None, batch["targets"].astype(jnp.float32)
        else:
            teacher_variables, method_constants = constants
            targets = method.targets(teacher_outputs(teacher_variables, images), method_constants)
        (logits, features), updates = student.apply(
            {"params": params["student"], "batch_stats": batch_stats["student"]}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_rng})
        loss, head_state, metrics = method.loss(params["head"], batch_stats["head"], {"logits": logits, **features},
                                                jax.lax.stop_gradient(targets),
                                                methods.LossContext(teacher=teacher_variables, labels=batch.get("label")))
        return loss, ({"student": updates.get("batch_stats", {}), "head": head_state}, metrics)

    return loss_fn


def initial_variables(config, method: methods.Method, teacher: teacher_lib.Teacher, statistics) -> dict:
    """The fresh student and the method's head, as the train state holds them."""
    student = trainer.init_variables(student_model(config, student_classes(method, teacher)), config.data.image_size,
                                     config.seed)
    head, head_state = method.init_head(jax.random.fold_in(jax.random.key(config.seed), 1),
                                        models.dim_from_config(config.student), statistics)
    return {"params": {"student": student["params"], "head": jax.device_get(head)},
            "batch_stats": {"student": student["batch_stats"], "head": jax.device_get(head_state)}}


def distill(config, workdir, mesh, teacher: teacher_lib.Teacher, method: methods.Method,
            statistics) -> trainer.FitResult:
    """Trains the student to the method's targets (or resumes doing so).

    With config.target_cache.enabled (cacheable methods) the teacher runs once, over the whole schedule, into a
    cache (reused when it matches), and the training steps read its targets instead; per-example methods (TCS)
    read theirs from their statistics and never run the teacher.
    """
    info = data.dataset_info(config.data, config.data.split)
    steps_per_epoch, schedule, tx = trainer.recipe(config, info.num_examples)
    state = trainer.create_train_state(initial_variables(config, method, teacher, statistics), tx, mesh, config.seed)
    settings = trainer.loop_settings(config, "distill", steps_per_epoch)
    logging.info("Distilling %s into %s (%d-d features; %d trainable parameters, the method's head included) with "
                 "%s: %d steps of %d images.", config.teacher.arch, config.student.arch,
                 models.dim_from_config(config.student), trainer.count_params(state.params), method.name,
                 settings.num_steps, config.train.batch_size)

    def pipeline_batches(start, with_crops=False):
        return data.train_batches(config.data, config.data.split, config.train.batch_size, seed=config.seed,
                                  start_step=start, with_crops=with_crops, augment=method.train_augmentation)

    constants = method.constants(statistics)
    cached = method.per_example_targets or config.target_cache.enabled
    if method.per_example_targets:
        def batches(start):
            for batch in pipeline_batches(start, with_crops=True):
                del batch["crop"]
                yield {**batch, "targets": method.example_targets(statistics, batch.pop("index"))}
        step_constants = ()
    elif config.target_cache.enabled:
        faults.point("stage.target_cache")
        cache = target_cache_for(config, workdir, mesh, teacher, method, constants, settings.num_steps)
        def batches(start):
            return target_cache.replay(pipeline_batches(start, with_crops=True), cache, start)
        step_constants = ()
    else:
        batches = pipeline_batches
        step_constants = parallel.replicate((teacher.variables, constants), mesh)
    loss_fn = make_loss_fn(config, method, teacher.num_classes, cached_targets=cached)
    faults.point("stage.distill")
    return trainer.fit(
        workdir=workdir, settings=settings, state=state,
        train_step=trainer.make_train_step(loss_fn, tx, mesh, settings.steps_per_call), constants=step_constants,
        batches=batches, mesh=mesh, lr_schedule=schedule)


def exported_student(config, method: methods.Method, state: trainer.TrainState) -> dict:
    """The student's variables on the host, without the method's head and without a pre-training classifier."""
    variables = parallel.to_host({"params": state.params["student"], "batch_stats": state.batch_stats["student"]})
    if not method.student_logits:
        return variables
    size = config.data.image_size
    backbone = jax.eval_shape(lambda: student_model(config).init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                                                 train=False))
    return {collection: {name: value for name, value in tree.items() if name in backbone.get(collection, {})}
            for collection, tree in variables.items()}


def target_cache_for(config, workdir, mesh, teacher: teacher_lib.Teacher, method: methods.Method, constants,
                     num_steps: int) -> target_cache.TargetCache:
    """The cache of this run's targets: reused when it was made for the same teacher, method, data and schedule."""
    targets_of = make_targets_fn(config, method, teacher.num_classes)
    size = config.data.image_size
    dim = int(np.prod(jax.eval_shape(targets_of, teacher.variables, constants,
                                     jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[1:]))
    directory = target_cache.cache_dir(config, workdir)
    wanted = target_cache.provenance(
        config, {**teacher_lib.data_provenance(config, teacher, config.data), **method.provenance()}, dim, num_steps)
    cache = target_cache.load(directory, wanted)
    if cache is not None:
        logging.info("Reusing the teacher-target cache in %s.", directory)
        return cache
    return target_cache.build(config, directory, mesh, targets_of, teacher.variables, constants, wanted)


def make_targets_fn(config, method: methods.Method, teacher_classes: int | None):
    """(teacher variables, method constants, images) -> targets: what the online step computes."""
    teacher_outputs = teacher_lib.outputs_fn(config, method.teacher_outputs, teacher_classes)
    return lambda variables, constants, images: method.targets(teacher_outputs(variables, images), constants)
