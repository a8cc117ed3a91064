"""The paper's optimiser: SGD with momentum, coupled weight decay on all parameters, step decay."""
from __future__ import annotations

import numpy as np
import optax


def step_decay_schedule(lr: float, steps_per_epoch: int, decay_every_epochs: int, decay_factor: float,
                        num_epochs: int) -> optax.Schedule:
    """lr, multiplied by `decay_factor` every `decay_every_epochs` epochs (torch's StepLR).

    Plain array arithmetic: traced inside the step, and numpy on the host, so logging the rate never runs
    (and waits for) anything on the accelerator.
    """
    boundaries = np.arange(decay_every_epochs, num_epochs, decay_every_epochs) * steps_per_epoch

    def schedule(count):
        return lr * decay_factor ** (count >= boundaries).sum()

    return schedule


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.SGD: the decay is added to the gradient before momentum, as the original scripts do."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum))
