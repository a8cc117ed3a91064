"""Losses and metrics of the distillation and supervised trainers.

All reductions run in float32 even when the model computes in bfloat16, so the loss and its gradient
keep their precision. An optional (B,) `mask` drops padded rows (the eval pipeline pads the last batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(per_example, mask):
    """Mean of (B,) values over the rows where mask is set (0 when no row is)."""
    if mask is None:
        return jnp.mean(per_example)
    mask = jnp.asarray(mask, jnp.float32)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def feature_distillation_loss(student_features, targets, weight, mask=None):
    """KDEP loss `weight * mean((f_s - t)**2)`, the mean over valid rows and all feature dims."""
    diff = jnp.asarray(student_features, jnp.float32) - jnp.asarray(targets, jnp.float32)
    return weight * _masked_mean(jnp.mean(jnp.square(diff), axis=-1), mask)


def cross_entropy_loss(logits, labels, mask=None):
    """Softmax cross-entropy with integer labels, averaged over valid rows."""
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits, jnp.float32),
                                                                 labels.astype(jnp.int32))
    return _masked_mean(nll, mask)


def top_k_correct(logits, labels, k):
    """Per-example 1.0 if the label is among the k highest logits, else 0.0 (for top-k accuracy)."""
    _, top = jax.lax.top_k(jnp.asarray(logits, jnp.float32), k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
