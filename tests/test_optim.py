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


def torch_linear_warmup_rates(warmup: int):
    """torch's LinearLR from lr / W to lr over the first W steps, as the cosine recipes chain it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
    rates = []
    for _ in range(warmup):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def test_step_decay_with_warmup_warms_up_then_decays_on_torch_step_lr_epochs():
    """A warm-up is applied to the step schedule too (it is not a cosine-only setting), and the decays still fall
    on StepLR's epochs, counted from the first step."""
    warmup = 6
    schedule = optim.step_decay_schedule(LR, STEPS_PER_EPOCH, DECAY_EVERY, FACTOR, EPOCHS, warmup / STEPS_PER_EPOCH)
    steps = np.arange(EPOCHS * STEPS_PER_EPOCH)
    expected = torch_step_lr_rates()
    expected[:warmup] = torch_linear_warmup_rates(warmup)
    host = np.array([schedule(np.int64(step)) for step in steps])
    traced = jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(host, expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6)
    assert np.isclose(host[0], LR / warmup) and host[warmup - 1] == LR


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


def test_cosine_schedule_with_warmup_matches_torch():
    """Per step: torch's LinearLR warm-up (from lr / W) then CosineAnnealingLR to 0, chained by SequentialLR."""
    warmup, total = 6, EPOCHS * STEPS_PER_EPOCH
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    schedule = optim.cosine_schedule(LR, STEPS_PER_EPOCH, warmup / STEPS_PER_EPOCH, EPOCHS)
    host = np.array([schedule(np.int64(step)) for step in range(total)])
    traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total)))
    np.testing.assert_allclose(host, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-7)


def test_adamw_decays_kernels_only_as_torch_adamw_with_two_groups():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)
    grads = [(rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)) for _ in range(3)]
    torch_kernel, torch_bias = (torch.tensor(x, requires_grad=True) for x in (kernel, bias))
    optimizer = torch.optim.AdamW([{"params": [torch_kernel], "weight_decay": 0.1},
                                   {"params": [torch_bias], "weight_decay": 0.0}], lr=0.01)
    tx = optim.adamw(lambda count: 0.01, weight_decay=0.1)
    params = {"dense": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    state = tx.init(params)
    for grad_kernel, grad_bias in grads:
        torch_kernel.grad, torch_bias.grad = torch.from_numpy(grad_kernel), torch.from_numpy(grad_bias)
        optimizer.step()
        updates, state = tx.update({"dense": {"kernel": grad_kernel, "bias": grad_bias}}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["dense"]["kernel"], torch_kernel.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["dense"]["bias"], torch_bias.detach().numpy(), rtol=1e-5, atol=1e-6)
