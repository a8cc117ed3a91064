"""kdep_jax.optim against torch.optim: the step-decay schedule (StepLR) and SGD with coupled weight decay."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from kdep_jax import optim

LR, STEPS_PER_EPOCH, DECAY_EVERY, FACTOR, EPOCHS = 0.3, 4, 3, 0.1, 10


def torch_step_lr_rates():
    """The learning rate of every step under torch's StepLR stepped once per epoch, as the original scripts do."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=DECAY_EVERY, gamma=FACTOR)
    rates = []
    for _ in range(EPOCHS):
        rates += [optimizer.param_groups[0]["lr"]] * STEPS_PER_EPOCH
        optimizer.step()  # an epoch's updates (no gradients here), then the scheduler, in torch's order
        scheduler.step()
    return np.array(rates)


def test_step_decay_matches_torch_step_lr_on_the_host_and_traced():
    schedule = optim.step_decay_schedule(LR, STEPS_PER_EPOCH, DECAY_EVERY, FACTOR, EPOCHS)
    steps = np.arange(EPOCHS * STEPS_PER_EPOCH)
    expected = torch_step_lr_rates()
    host = np.array([schedule(np.int64(step)) for step in steps])
    assert all(isinstance(schedule(np.int64(step)), np.floating) for step in steps[:3])  # no device work
    traced = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(host, expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6)


def test_sgd_matches_torch_sgd_with_weight_decay_and_momentum():
    rng = np.random.default_rng(0)
    params = rng.normal(size=(5, 3))
    grads = [rng.normal(size=(5, 3)) for _ in range(6)]
    schedule = optim.step_decay_schedule(LR, 2, 1, FACTOR, 3)
    tx = optim.sgd(schedule, 0.9, 5e-4)
    jax_params = jnp.asarray(params, jnp.float32)
    state = tx.init(jax_params)
    torch_params = torch.tensor(params, requires_grad=True)
    optimizer = torch.optim.SGD([torch_params], lr=LR, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=FACTOR)  # stepped per step here
    for grad in grads:
        updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)
        torch_params.grad = torch.tensor(grad)
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(np.asarray(jax_params), torch_params.detach().numpy(), rtol=1e-5, atol=1e-6)
