"""The training loop shared by every trainer (supervised, distillation, transfer).

A trainer supplies a loss function and its data; this module owns the rest: the jitted step over the
device mesh, checkpoints and resume, metrics, progress, divergence and preemption handling.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from kdep_jax import optim, parallel
from kdep_jax.checkpointing import Checkpointer
from kdep_jax.metrics import MetricWriter, Progress


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, say); the message says what happened and what to do."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(variables, tx: optax.GradientTransformation, mesh) -> TrainState:
    """A replicated train state from host variables (identical on every process)."""
    variables = parallel.to_host(variables)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    state = TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params))
    return parallel.replicate(jax.tree.map(np.asarray, state), mesh)


# loss_fn(params, batch_stats, batch, constants) -> (loss, (new_batch_stats, metrics))
LossFn = Callable[[Any, Any, dict, Any], tuple[jax.Array, tuple[Any, dict]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh):
    """One jitted SGD step: batch sharded over 'data', state replicated and donated.

    `constants` (the frozen teacher, the alignment) are replicated arguments rather than closed-over
    values, so they are not baked into the compiled program.
    """

    def step(state: TrainState, batch: dict, constants):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, constants)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, {"loss": loss, **metrics}

    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(step, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


@dataclasses.dataclass
class LoopSettings:
    name: str
    num_steps: int
    images_per_step: int
    log_every_steps: int
    checkpoint_every_steps: int
    checkpoint_every_secs: float | None
    keep_checkpoints: int
    eval_every_steps: int | None = None


def sgd_recipe(config, num_examples: int):
    """Steps per epoch, the step-decay schedule and SGD of `config.train`, as every trainer uses them."""
    steps_per_epoch = num_examples // config.train.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{config.data.name}/{config.data.split} has {num_examples} examples, fewer than one batch "
                         f"of config.train.batch_size={config.train.batch_size}; lower the batch size.")
    schedule = optim.step_decay_schedule(config.train.lr, steps_per_epoch, config.train.lr_decay_every_epochs,
                                         config.train.lr_decay_factor, config.train.num_epochs)
    return steps_per_epoch, schedule, optim.sgd(schedule, config.train.momentum, config.train.weight_decay)


def loop_settings(config, name: str, steps_per_epoch: int, eval_every_steps: int | None = None) -> LoopSettings:
    return LoopSettings(
        name=name, num_steps=steps_per_epoch * config.train.num_epochs, images_per_step=config.train.batch_size,
        log_every_steps=config.log_every_steps, checkpoint_every_steps=config.checkpoint_every_steps,
        checkpoint_every_secs=config.checkpoint_every_secs, keep_checkpoints=config.keep_checkpoints,
        eval_every_steps=eval_every_steps)


class _Preemption:
    """Remembers a SIGTERM (what cloud schedulers send) so the loop can save and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    preempted: bool
    last_eval: dict | None


def fit(*, workdir, settings: LoopSettings, state: TrainState, train_step, constants,
        batches: Callable[[int], Iterator[dict]], mesh, lr_schedule: optax.Schedule,
        evaluate: Callable[[TrainState], dict] | None = None, checkpoint_meta: dict | None = None) -> FitResult:
    """Runs (or resumes) training to `settings.num_steps`, checkpointing in `workdir/checkpoints`.

    `batches(start_step)` must yield the local batches for steps start_step, start_step + 1, ...;
    the input pipeline makes each batch a function of the seed and the step, so a resumed run sees
    exactly the batches an uninterrupted one would.
    """
    workdir = epath.Path(workdir)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=settings.keep_checkpoints)
    start_step = 0
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state)
        start_step = int(parallel.to_host(state.step))
        logging.info("%s: resuming from the checkpoint at step %d.", settings.name, start_step)
    writer = MetricWriter(workdir, resume_step=start_step)
    progress = Progress(settings.name, settings.num_steps, start_step, settings.images_per_step)
    meta = dict(checkpoint_meta or {})
    last_eval = None
    pending_metrics: list[dict] = []
    unlogged = None  # the last log step's (step, metrics, images/s), fetched once the next step is queued
    last_save_time = time.monotonic()
    preempted = False

    def save(step):
        checkpointer.save(step, state, {**meta, "step": step})

    def log(step, window, images_per_sec):
        row = _average(window)
        if not math.isfinite(row["loss"]):
            checkpointer.wait()
            raise TrainingError(
                f"{settings.name}: the loss became {row['loss']} at or before step {step}. "
                f"The last good checkpoint (step {checkpointer.latest_step()}) in "
                f"{checkpointer.directory} is kept. Lower config.train.lr (or compute in float32 "
                f"with --config.dtype=float32) and rerun the same command to resume from it.")
        row.update(lr=float(lr_schedule(np.int64(step - 1))), images_per_sec=images_per_sec)
        progress.set_postfix(loss=row["loss"], lr=row["lr"])
        writer.write(step, row)

    try:
        with _Preemption() as preemption:
            data = batches(start_step)
            for step in range(start_step + 1, settings.num_steps + 1):
                state, metrics = train_step(state, parallel.shard_batch(next(data), mesh), constants)
                pending_metrics.append(metrics)
                progress.update()
                if unlogged is not None:  # fetching it now leaves the device busy with this step
                    log(*unlogged)
                    unlogged = None

                stop = preemption.reached(step)
                is_last = step == settings.num_steps
                save_due = is_last or stop or step % settings.checkpoint_every_steps == 0
                log_due = step % settings.log_every_steps == 0
                if log_due and settings.checkpoint_every_secs:
                    save_due |= _agree(time.monotonic() - last_save_time > settings.checkpoint_every_secs)
                eval_due = evaluate is not None and (
                    is_last or bool(settings.eval_every_steps and step % settings.eval_every_steps == 0))
                if log_due or save_due:
                    unlogged = (step, pending_metrics, progress.images_per_sec())
                    pending_metrics = []
                if unlogged is not None and (save_due or eval_due):  # a checkpoint only after its loss is checked
                    log(*unlogged)
                    unlogged = None
                if eval_due:
                    last_eval = evaluate(state)
                    writer.write(step, last_eval)
                    logging.info("%s step %d: %s", settings.name, step, _format(last_eval))
                if save_due:
                    save(step)
                    last_save_time = time.monotonic()
                if stop:
                    preempted = True
                    logging.warning("%s: stopped at step %d after a SIGTERM; the checkpoint is saved. Rerun the "
                                    "same command to resume.", settings.name, step)
                    break
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
    return FitResult(state=state, preempted=preempted, last_eval=last_eval)


def _agree(local_decision: bool) -> bool:
    """Process 0's decision, on every process, so that all of them save at the same step."""
    if jax.process_count() == 1:
        return local_decision
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(local_decision)))


def _average(metrics: list[dict]) -> dict:
    fetched = jax.device_get(metrics)
    return {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}


def _format(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_variables(model, image_size: int, seed: int):
    """Initialises a model on the host; the same seed gives the same variables on every process."""
    init = jax.jit(functools.partial(model.init, train=False))
    # The "rbg" generator compiles far faster than the default on CPU; initialisation is as random.
    key = jax.random.key(seed, impl="rbg")
    return jax.device_get(init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))
