"""What every distillation objective provides to the one distillation trainer (`kdep_jax.distill`).

A method says (a) which teacher outputs it needs, (b) the statistics it computes before training, (c) its
trainable head, which lives beside the student in the train state and is dropped at export, (d) its loss,
and (e) whether its targets can be cached. The trainer, data, checkpoints and export are shared; the
trainer never asks which method it runs.

Added for ScaleKD, whose loss runs part of the frozen teacher on the student's projected maps and may use labels:
every loss receives a `LossContext` (the teacher's variables and the batch's labels), which the other methods
ignore; `targets` may return a dict of arrays when the method is not cacheable; `needs_labels` may be set per
instance (a config field) and `label_free_fix` says in validation's message how to do without labels.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kdep_jax.errors import ConfigError


class Method:
    name = ""
    # (a) Teacher outputs the targets are made of: "pre_relu", "pooled", "logits", "stage1".."stage4".
    teacher_outputs: tuple[str, ...] = ()
    # The student pre-trains with a classifier as wide as the teacher's (its logits are distilled).
    student_logits = False
    # (e) The targets are a function of the teacher and the (cropped, flipped) image alone, so the target cache
    # can record them once and replay them.
    cacheable = False
    # The targets are a function of the example alone (one teacher pass before training, no augmentation): the
    # statistics hold a per-example table, and the teacher is not run during training.
    per_example_targets = False
    # The loss uses the data's labels (every method here is label-free unless it says so).
    needs_labels = False
    # How to run without labels, for the message that refuses needs_labels on unlabeled images.
    label_free_fix = "choose a label-free method such as 'kdep'"
    # The student trains on the training augmentation (False: on the eval transform, as per-example targets are).
    train_augmentation = True

    def __init__(self, config):
        self.config = config

    def check(self, teacher_dim: int, student_dim: int, teacher_classes: int | None) -> None:
        """Raises ConfigError when this method cannot run with this teacher and student."""
        if self.student_logits and teacher_classes is None:
            raise ConfigError(
                f"config.method={self.name!r} distils the teacher's logits, but the teacher was converted without its "
                f"classifier (its meta.json has num_classes null). Convert the full checkpoint (with its fc / "
                f"classifier / heads) again, or choose a feature method such as 'kdep'.")

    def provenance(self) -> dict:
        """Every setting of the method that its statistics and cached targets depend on."""
        return {"method": self.name}

    # (b)
    def statistics(self, workdir, mesh, teacher) -> Any:
        """Computed (or reused from the workdir) before training; None when the method needs none."""
        return None

    def constants(self, statistics) -> Any:
        """The part of the statistics the targets need on the devices (replicated), or None."""
        return None

    # (c)
    def init_head(self, key: jax.Array, student_dim: int, statistics) -> tuple[dict, dict]:
        """(trainable parameters, non-trainable state) of the method's head; empty for most methods."""
        return {}, {}

    def inputs(self, images: jax.Array, rng: jax.Array) -> jax.Array:
        """The images both networks see (function matching mixes them); the batch's images by default."""
        return images

    def targets(self, teacher_outputs: dict, constants) -> Any:
        """(B, ...) float32 targets from the teacher's outputs: what the loss compares with and the cache records
        (one array when cacheable; a dict of (B, ...) arrays otherwise)."""
        raise NotImplementedError

    def example_targets(self, statistics, index) -> Any:
        """Per-example targets for the examples `index` (per_example_targets methods)."""
        raise NotImplementedError

    # (d)
    def loss(self, head: dict, head_state: dict, student: dict, targets, context: LossContext | None = None):
        """(loss, new head state, metrics) from the student's outputs ({"logits", "pre_relu", "pooled", ...})."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LossContext:
    """What a loss may use beside the student's outputs and the targets.

    teacher: the frozen teacher's variables, None when the targets come from a cache or a per-example table. They
    are constants of the step: no gradient reaches them, but gradients flow through the teacher's layers into
    whatever the loss feeds them (ScaleKD's teacher parameter perception).
    labels: the batch's (B,) int32 labels (all 0 on unlabeled images: only methods with needs_labels use them),
    None when the batch brings none.
    """
    teacher: dict | None
    labels: jax.Array | None


def kl_divergence(p_log: jax.Array, q_log: jax.Array) -> jax.Array:
    """Per-row KL(p || q) from log-probabilities, summed over classes, in float32."""
    p_log, q_log = jnp.asarray(p_log, jnp.float32), jnp.asarray(q_log, jnp.float32)
    return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)
