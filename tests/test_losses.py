"""kdep_jax.losses against direct numpy float64 formulas and finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdep_jax.losses import cross_entropy_loss, feature_distillation_loss, top_k_correct

B, D, C = 6, 5, 7


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _central_differences(f, x, eps):
    grad = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
    return grad


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_feature_distillation_loss_value_and_mask(rng):
    fs, t = rng.standard_normal((B, D)), rng.standard_normal((B, D))
    loss = feature_distillation_loss(fs.astype(np.float32), t.astype(np.float32), 20.0)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 20.0 * np.mean((fs - t) ** 2), rtol=1e-6)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    masked = feature_distillation_loss(fs.astype(np.float32), t.astype(np.float32), 3.0, mask=mask)
    np.testing.assert_allclose(masked, 3.0 * np.mean((fs[mask] - t[mask]) ** 2), rtol=1e-6)


def test_feature_distillation_loss_bfloat16_computes_in_float32(rng):
    fs = jnp.asarray(rng.standard_normal((B, D)), jnp.bfloat16)
    t = jnp.asarray(rng.standard_normal((B, D)), jnp.bfloat16)
    loss = feature_distillation_loss(fs, t, 1.0)
    assert loss.dtype == jnp.float32
    reference = np.mean((np.asarray(fs, np.float64) - np.asarray(t, np.float64)) ** 2)
    np.testing.assert_allclose(loss, reference, rtol=1e-6)


def test_feature_distillation_loss_gradient(rng):
    fs = rng.standard_normal((B, D)).astype(np.float32)
    t = rng.standard_normal((B, D)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    grad = np.asarray(jax.grad(feature_distillation_loss)(fs, t, 3.0, mask))
    analytic = 2 * 3.0 * (fs.astype(np.float64) - t) * mask[:, None] / (mask.sum() * D)
    np.testing.assert_allclose(grad, analytic, rtol=1e-5, atol=1e-7)
    numeric = _central_differences(lambda x: feature_distillation_loss(x, t, 3.0, mask), fs, 1e-2)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
    assert np.all(grad[~mask] == 0)  # padded rows get no gradient


def test_cross_entropy_matches_log_softmax(rng):
    logits = 5 * rng.standard_normal((B, C))
    labels = rng.integers(0, C, B)
    reference = -_log_softmax(logits)[np.arange(B), labels]
    np.testing.assert_allclose(cross_entropy_loss(logits.astype(np.float32), labels), reference.mean(), rtol=1e-5)
    mask = np.array([0, 1, 1, 0, 1, 1], bool)
    masked = cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), labels, mask)
    assert masked.dtype == jnp.float32
    bf16 = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(masked, -_log_softmax(bf16)[np.arange(B), labels][mask].mean(), rtol=1e-5)


def test_cross_entropy_gradient(rng):
    logits = rng.standard_normal((B, C)).astype(np.float32)
    labels = rng.integers(0, C, B)
    grad = np.asarray(jax.grad(cross_entropy_loss)(logits, labels))
    analytic = (np.exp(_log_softmax(logits.astype(np.float64))) - np.eye(C)[labels]) / B
    np.testing.assert_allclose(grad, analytic, rtol=1e-5, atol=1e-7)
    numeric = _central_differences(lambda x: cross_entropy_loss(x, labels), logits, 1e-2)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_top_k_correct(rng):
    logits = rng.standard_normal((50, C)).astype(np.float32)
    labels = rng.integers(0, C, 50)
    rank = (logits > logits[np.arange(50), labels][:, None]).sum(axis=1)  # distinct values: no ties
    for k in (1, 3, C):
        correct = np.asarray(jax.jit(top_k_correct, static_argnums=2)(logits, labels, k))
        assert correct.shape == (50,) and set(np.unique(correct)) <= {0.0, 1.0}
        np.testing.assert_array_equal(correct, (rank < k).astype(np.float32))
