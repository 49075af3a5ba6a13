"""Learning-rate schedules and the optimizer, from ``OptimConfig``."""

from __future__ import annotations

import optax

from hkt_jax.config import OptimConfig


def make_schedule(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    if optim.schedule == "multistep":
        boundaries = {int(m * steps_per_epoch): optim.decay_factor for m in optim.milestones}
        return optax.piecewise_constant_schedule(optim.learning_rate, boundaries)
    if optim.schedule == "cosine":
        warmup = int(optim.warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
        )
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.learning_rate)
    raise ValueError(f"optim.schedule must be 'multistep', 'cosine' or 'constant', got {optim.schedule!r}")


def make_optimizer(optim: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD as PyTorch does it: weight decay added to the gradient, then momentum."""
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
    )
