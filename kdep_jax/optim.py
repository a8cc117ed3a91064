"""The paper's optimiser: SGD with momentum, coupled weight decay on all parameters, step decay."""
from __future__ import annotations

import optax


def step_decay_schedule(lr: float, steps_per_epoch: int, decay_every_epochs: int, decay_factor: float,
                        num_epochs: int) -> optax.Schedule:
    """lr, multiplied by `decay_factor` every `decay_every_epochs` epochs (torch's StepLR)."""
    boundaries = {epoch * steps_per_epoch: decay_factor
                  for epoch in range(decay_every_epochs, num_epochs, decay_every_epochs)}
    return optax.piecewise_constant_schedule(lr, boundaries)


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD: the decay is added to the gradient before momentum, as the original scripts do."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
