"""The optimisers and schedules of the recipes: the KDEP paper's SGD with step decay, and the cosine schedule
with warm-up and AdamW that other methods' recipes use (SSLD, function matching).

Schedules are plain array arithmetic: traced inside the step, and numpy on the host, so logging the rate
never runs (and waits for) anything on the accelerator.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _warmed_up(rate, count, lr: float, warmup: int):
    """`rate`, except a linear warm-up from lr / W to lr over the first W steps (torch's LinearLR)."""
    if not warmup:
        return rate
    xp = jnp if isinstance(count, jax.Array) else np
    return xp.where(count < warmup, lr * (count + 1) / warmup, rate)


def step_decay_schedule(lr: float, steps_per_epoch: int, decay_every_epochs: int, decay_factor: float,
                        num_epochs: int, warmup_epochs: float = 0.0) -> optax.Schedule:
    """lr, multiplied by `decay_factor` every `decay_every_epochs` epochs (torch's StepLR), after an optional
    linear warm-up (Goyal et al.'s for large batches); the decays still count from the first step."""
    boundaries = np.arange(decay_every_epochs, num_epochs, decay_every_epochs) * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)

    def schedule(count):
        return _warmed_up(lr * decay_factor ** (count >= boundaries).sum(), count, lr, warmup)

    return schedule


def cosine_schedule(lr: float, steps_per_epoch: int, warmup_epochs: float, num_epochs: int) -> optax.Schedule:
    """A linear warm-up from lr / W to lr over the first W steps, then a cosine decay to 0 at the last step
    (PaddleClas's LinearWarmup + CosineAnnealing, per step)."""
    warmup, total = round(warmup_epochs * steps_per_epoch), num_epochs * steps_per_epoch

    def schedule(count):
        xp = jnp if isinstance(count, jax.Array) else np
        progress = xp.clip((count - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return _warmed_up(0.5 * lr * (1.0 + xp.cos(np.pi * progress)), count, lr, warmup)

    return schedule


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD: the decay is added to the gradient before momentum, as the original scripts do."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))


def adamw(schedule: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    """Adam with decoupled weight decay on the kernels only (big_vision's recipe for function matching)."""
    kernels_only = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
    return optax.adamw(schedule, weight_decay=weight_decay, mask=kernels_only)


def create(train, steps_per_epoch: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The schedule and optimiser `config.train` asks for (validation.py has checked its names)."""
    if train.schedule == "cosine":
        schedule = cosine_schedule(train.lr, steps_per_epoch, train.warmup_epochs, train.num_epochs)
    else:
        schedule = step_decay_schedule(train.lr, steps_per_epoch, train.lr_decay_every_epochs, train.lr_decay_factor,
                                       train.num_epochs, train.warmup_epochs)
    tx = (adamw(schedule, train.weight_decay) if train.optimizer == "adamw"
          else sgd(schedule, train.momentum, train.weight_decay))
    if train.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    return schedule, tx
