"""The training loop shared by every trainer (supervised, distillation, transfer).

A trainer supplies a loss function and its data; this module owns the rest: the jitted step over the
device mesh, checkpoints and resume, metrics, progress, divergence and preemption handling.
"""
from __future__ import annotations

import ctypes
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

from kdep_jax import faults, optim, parallel
from kdep_jax.checkpointing import Checkpointer
from kdep_jax.errors import UserError
from kdep_jax.metrics import MetricWriter, Progress


class TrainingError(UserError):
    """Training cannot go on (a NaN loss, say); the message says what happened and what to do."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32), split once per step: dropout, mixup


def create_train_state(variables, tx: optax.GradientTransformation, mesh, seed: int) -> TrainState:
    """A replicated train state from host variables (identical on every process).

    The step's random stream is separate from the initialisation's (which `init_variables` draws from
    the same seed), and stored as raw key data so that checkpoints hold plain arrays.
    """
    variables = parallel.to_host(variables)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM))
    state = TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), rng=rng)
    return parallel.replicate(jax.tree.map(np.asarray, state), mesh)


_TRAIN_STREAM = 0x7261696E  # folded into the seed's key: the training steps' stream

# loss_fn(params, batch_stats, batch, constants, rng) -> (loss, (new_batch_stats, metrics)); rng is this
# step's key, the same on every device (a sharded random draw splits it by position, not by device).
LossFn = Callable[[Any, Any, dict, Any, jax.Array], tuple[jax.Array, tuple[Any, dict]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh, steps_per_call: int = 1):
    """Up to `steps_per_call` SGD steps in one XLA execution: (state, batches, count, constants) -> (state, metrics).

    `batches`: steps_per_call global batches stacked on a leading axis (`parallel.shard_batches`), of which the
    first `count` are trained on, one per step; each metric comes back stacked the same way, its first `count`
    entries set. The state is replicated and donated; `constants` (the frozen teacher, the alignment) are
    replicated arguments rather than closed-over values, so they are not baked into the compiled program.

    Why several steps per call: XLA:CPU allocates each execution's temporaries afresh (0.75 GiB for the
    ResNet-50 -> ResNet-18 step), and writing them costs about 200,000 page faults; the steps of one call reuse
    them (the ResNet-50 -> ResNet-18 and -> MobileNetV2 steps 1.08-1.10x and 1.10-1.15x faster at 4 per call on a
    Zen 5 EPYC, benchmarks/README.md). `count` is an argument, so a call can stop at any step (a log, a checkpoint,
    the end) without compiling again. The steps compute what as many calls of one step would, to the bit.
    """

    def one_step(state: TrainState, batch: dict, constants):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, constants, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        return new_state, {"loss": loss, **metrics}

    def steps(state: TrainState, batches: dict, count: jax.Array, constants):
        def batch_at(index):
            return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False), batches)

        def body(index, carry):
            state, metrics = carry
            state, step_metrics = one_step(state, batch_at(index), constants)
            return state, jax.tree.map(lambda stacked, value: stacked.at[index].set(value), metrics, step_metrics)

        metric_shapes = jax.eval_shape(one_step, state, batch_at(0), constants)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((steps_per_call, *s.shape), s.dtype), metric_shapes)
        return jax.lax.fori_loop(0, count, body, (state, metrics))

    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(steps, in_shardings=(replicated, parallel.stacked_batch_sharding(mesh), replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


@dataclasses.dataclass
class LoopSettings:
    name: str
    num_steps: int
    images_per_step: int
    log_every_steps: int
    steps_per_call: int
    checkpoint_every_steps: int
    checkpoint_every_secs: float | None
    keep_checkpoints: int
    eval_every_steps: int | None = None
    field_prefix: str = ""  # where this loop's config sits in the run's config ("teacher.train."), for messages


def recipe(config, num_examples: int):
    """Steps per epoch, the learning-rate schedule and the optimiser of `config.train`, as every trainer uses them.

    `validation.validate` has checked that one epoch holds at least one batch.
    """
    steps_per_epoch = num_examples // config.train.batch_size
    schedule, tx = optim.create(config.train, steps_per_epoch)
    return steps_per_epoch, schedule, tx


def loop_settings(config, name: str, steps_per_epoch: int, eval_every_steps: int | None = None,
                  field_prefix: str = "") -> LoopSettings:
    return LoopSettings(
        name=name, num_steps=steps_per_epoch * config.train.num_epochs, images_per_step=config.train.batch_size,
        log_every_steps=config.log_every_steps, steps_per_call=config.steps_per_call,
        checkpoint_every_steps=config.checkpoint_every_steps,
        checkpoint_every_secs=config.checkpoint_every_secs, keep_checkpoints=config.keep_checkpoints,
        eval_every_steps=eval_every_steps, field_prefix=field_prefix)


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

    def reached(self, steps: range) -> bool:
        """After a call ran `steps`. Several processes check each step, since they agree on the step to stop at (one
        after the latest any of them checked), and stop at the end of the call that holds it."""
        if jax.process_count() > 1:
            reached = [multihost_utils.reached_preemption_sync_point(step) for step in steps]
            return any(reached)
        return self.requested

    def arrived_late(self) -> bool:
        """A SIGTERM after the last step was checked (while its checkpoint was written): one process only, as
        the multi-process sync point is per step."""
        return jax.process_count() == 1 and self.requested

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
    exactly the batches an uninterrupted one would. A run restored at its last step only evaluates.
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
    pending_metrics: list[tuple[dict, int]] = []  # (stacked metrics, steps) of each call since the last log
    unlogged = None  # the last log step's (first step, step, metrics, images/s), fetched once the next step is queued
    last_save_time = time.monotonic()
    preempted = False

    def diverged(first_step: int, step: int, what: str):
        """Keeps only checkpoints whose parameters gave finite losses after them, and says how to go on."""
        checkpointer.wait()
        checkpointer.delete_from(first_step - 1)
        kept = checkpointer.latest_step()
        lr = float(lr_schedule(np.int64(0)))
        field = f"{settings.field_prefix}train.lr"
        where = (f"the last good checkpoint (step {kept}) in {checkpointer.directory} is kept" if kept is not None
                 else "no checkpoint from before it is left, so the rerun starts this stage over")
        return TrainingError(
            f"{settings.name}: {what} at or before step {step}; {where}. Resume with a lower learning rate: rerun "
            f"the same command with --config.{field}={lr / 10:g} --config.allow_changes={field} (or compute in "
            f"float32, --config.dtype=float32, if it was bfloat16).")

    def log(first_step, step, window, images_per_sec):
        row = _average(window)
        if not math.isfinite(row["loss"]):
            raise diverged(first_step, step, f"the loss became {row['loss']}")
        row.update(lr=float(lr_schedule(np.int64(step - 1))), images_per_sec=images_per_sec)
        progress.set_postfix(loss=row["loss"], lr=row["lr"])
        writer.write(step, row)

    def save(step):
        if not _all_finite(state.params):
            raise diverged(step, step, "the parameters became infinite or NaN")
        checkpointer.save(step, state, {**meta, "step": step})
        faults.point(f"{settings.name}.saving")  # the checkpoint is being written (asynchronously)

    try:
        with _Preemption() as preemption:
            data = batches(start_step)
            step = start_step
            while step < settings.num_steps:
                count = _call_length(settings, step)
                local_batches = [next(data) for _ in range(count)]
                state, metrics = train_step(state, parallel.shard_batches(local_batches, mesh, settings.steps_per_call),
                                            parallel.replicate(np.int32(count), mesh), constants)
                if step == start_step:  # compiled now (the steps themselves may still run)
                    release_freed_host_memory()
                first_step, step = step + 1, step + count
                faults.point(f"{settings.name}.step")
                pending_metrics.append((metrics, count))
                progress.update(count)
                if unlogged is not None:  # fetching it now leaves the device busy with this call
                    log(*unlogged)
                    unlogged = None

                # Calls end at these steps (_call_length), so each check below sees the step it names.
                is_last = step == settings.num_steps
                stop = preemption.reached(range(first_step, step + 1))  # at the last step too: the stage is saved
                save_due = is_last or stop or step % settings.checkpoint_every_steps == 0
                log_due = step % settings.log_every_steps == 0
                if log_due and settings.checkpoint_every_secs:
                    save_due |= _agree(time.monotonic() - last_save_time > settings.checkpoint_every_secs)
                eval_due = evaluate is not None and (
                    is_last or bool(settings.eval_every_steps and step % settings.eval_every_steps == 0))
                if log_due or save_due:
                    logged_steps = sum(n for _, n in pending_metrics)
                    unlogged = (step - logged_steps + 1, step, pending_metrics, progress.images_per_sec())
                    pending_metrics = []
                if unlogged is not None and (save_due or eval_due):  # a checkpoint only after its loss is checked
                    log(*unlogged)
                    unlogged = None
                if save_due:  # before the evaluation, so that a failing evaluation loses no training
                    save(step)
                    last_save_time = time.monotonic()
                if eval_due:
                    last_eval = evaluate(state)
                    writer.write(step, last_eval)
                    logging.info("%s step %d: %s", settings.name, step, _format(last_eval))
                if stop:
                    preempted = True
                    logging.warning("%s: stopped at step %d after a SIGTERM; the checkpoint is saved. Rerun the "
                                    "same command to resume.", settings.name, step)
                    break
            if not preempted and preemption.arrived_late():  # the stage is done; the run still stops after it
                preempted = True
                logging.warning("%s: a SIGTERM arrived as the last checkpoint was written; it is saved. Rerun the "
                                "same command to go on.", settings.name)
            if evaluate is not None and last_eval is None and not preempted:  # restored at the last step
                last_eval = evaluate(state)
                logging.info("%s step %d: %s", settings.name, settings.num_steps, _format(last_eval))
    finally:
        progress.close()
        checkpointer.close()
        writer.close()
    return FitResult(state=state, preempted=preempted, last_eval=last_eval)


@jax.jit
def _all_finite_on_device(params) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _all_finite(params) -> bool:
    return bool(parallel.to_host(_all_finite_on_device(params)))


def _agree(local_decision: bool) -> bool:
    """Process 0's decision, on every process, so that all of them save at the same step."""
    if jax.process_count() == 1:
        return local_decision
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(local_decision)))


def _average(window: list[tuple[dict, int]]) -> dict:
    """The mean of each metric over the steps of a window of calls: (stacked metrics, steps in that call)."""
    fetched = jax.device_get([metrics for metrics, _ in window])
    return {name: float(np.mean(np.concatenate([m[name][:n] for m, (_, n) in zip(fetched, window)])))
            for name in fetched[0]}


def _call_length(settings: LoopSettings, step: int) -> int:
    """How many steps the call after `step` runs: up to steps_per_call, ending at the next step that logs, may save
    or evaluate, or ends the loop."""
    every = (settings.log_every_steps, settings.checkpoint_every_steps, settings.eval_every_steps)
    next_stop = min([settings.num_steps] + [(step // n + 1) * n for n in every if n])
    return min(settings.steps_per_call, next_stop - step)


def _format(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def release_freed_host_memory() -> None:
    """Returns the heap that compiling freed to the OS. glibc keeps freed memory for reuse, but XLA takes its
    large buffers from fresh mappings, so after compiling a CPU training step 0.2-0.6 GiB of the compiler's heap
    would stay in the process for nothing (benchmarks/README.md). A no-op without glibc's malloc_trim."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    malloc_trim(0)


def init_variables(model, image_size: int, seed: int):
    """Initialises a model on the host; the same seed gives the same variables on every process."""
    init = jax.jit(functools.partial(model.init, train=False))
    # The "rbg" generator compiles far faster than the default on CPU; initialisation is as random.
    key = jax.random.key(seed, impl="rbg")
    return jax.device_get(init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32)))
