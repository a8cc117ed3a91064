"""Label-free distillation of the teacher's logits: Hinton's KD, SSLD (PaddleClas) and function matching.

(a) the teacher's logits (a teacher converted with its classifier); the student pre-trains with a classifier
of the same width, dropped at export: none of them uses labels, so any images will do; (b) no statistics;
(c) no head; (d) below, each from its source (METHODS.md); (e) the logits of a crop never change, so KD and
SSLD are cacheable; function matching mixes every batch with a fresh coefficient, so it is not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kdep_jax.methods.base import Method, kl_divergence


class _LogitMethod(Method):
    teacher_outputs = ("logits",)
    student_logits = True
    cacheable = True

    def targets(self, teacher_outputs, constants):
        return teacher_outputs["logits"]


class LogitKD(_LogitMethod):
    """Hinton et al.: `T**2 * KL(softmax(z_t / T) || softmax(z_s / T))`, batch mean, T = config.logit_kd.temperature
    (4: the KDEP paper's logit baseline). The paper's point: logits are thrown away downstream."""
    name = "logit_kd"

    def provenance(self):
        return {"method": self.name}  # the targets are the raw logits; T enters only the loss

    def loss(self, head, head_state, student, targets, context=None):
        return temperature_kl(student["logits"], targets, self.config.logit_kd.temperature), head_state, {}


class SSLD(_LogitMethod):
    """PaddleClas's original JSDivLoss (ppcls/modeling/loss.py, commit fbb36fd; today DMLLoss): the symmetric
    `0.5 * [KL(p_t || p_s) + KL(p_s || p_t)]` at T = 1, `p * log((p + eps) / (q + eps))` summed over classes,
    eps 1e-12, batch mean. Teacher and student see the same augmented image."""
    name = "ssld"
    eps = 1e-12

    def loss(self, head, head_state, student, targets, context=None):
        p_s = jax.nn.softmax(jnp.asarray(student["logits"], jnp.float32), axis=-1)
        p_t = jax.nn.softmax(jnp.asarray(targets, jnp.float32), axis=-1)

        def kl(p, q):
            return jnp.sum(p * jnp.log((p + self.eps) / (q + self.eps)), axis=-1)

        return jnp.mean(0.5 * (kl(p_t, p_s) + kl(p_s, p_t))), head_state, {}


class SSLDCrossEntropy(_LogitMethod):
    """The later SSLD recipes (PP-HGNetV2 *_ssld_stage*.yaml): soft-label cross-entropy
    `-sum(softmax(z_t) * log_softmax(z_s))`, batch mean."""
    name = "ssld_ce"

    def loss(self, head, head_state, student, targets, context=None):
        p_t = jax.nn.softmax(jnp.asarray(targets, jnp.float32), axis=-1)
        log_p_s = jax.nn.log_softmax(jnp.asarray(student["logits"], jnp.float32), axis=-1)
        return jnp.mean(-jnp.sum(p_t * log_p_s, axis=-1)), head_state, {}


class FunctionMatching(_LogitMethod):
    """Beyer et al., "Knowledge distillation: a good teacher is patient and consistent" (big_vision's distill
    trainer): both networks see the same mixed-up crop, one coefficient a ~ Beta(alpha, alpha) per batch,
    a = max(a, 1 - a), mixed with the batch rolled by one; loss `T**2 * KL(p_t || p_s)` at T = 1, batch mean."""
    name = "fm"
    cacheable = False  # the mixing coefficient is drawn anew for every step

    def inputs(self, images, rng):
        alpha = self.config.fm.mixup_alpha
        a = jax.random.beta(rng, alpha, alpha)
        a = jnp.maximum(a, 1.0 - a).astype(images.dtype)
        return a * images + (1.0 - a) * jnp.roll(images, 1, axis=0)

    def loss(self, head, head_state, student, targets, context=None):
        return temperature_kl(student["logits"], targets, self.config.fm.temperature), head_state, {}


def temperature_kl(student_logits, teacher_logits, temperature: float) -> jax.Array:
    """`T**2 * KL(softmax(z_t / T) || softmax(z_s / T))`, batch mean, float32."""
    t = float(temperature)
    p_log = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / t, axis=-1)
    q_log = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / t, axis=-1)
    return t * t * jnp.mean(kl_divergence(p_log, q_log))
