"""Learning-rate schedules and the optimizer, from ``OptimConfig``.

SGD is PyTorch's (weight decay added to the gradient, then momentum), as the
CIFAR recipes use it; AdamW with a one-cycle schedule and global-norm clipping
is RAFT's recipe (``torch.optim.AdamW`` + ``OneCycleLR(pct_start=0.05,
cycle_momentum=False, anneal_strategy="linear")`` over ``steps + 100``,
``clip_grad_norm_``).

Deep CIFAR ResNets (110 layers and more) may start with a low-rate warm-up
(``optim.low_lr_warmup_steps``, He et al. 2016, Sec. 4.2): a pure function of
the step like every schedule here, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from hkt_jax.training.config import OptimConfig

ONE_CYCLE_DIV_FACTOR = 25.0  # torch OneCycleLR: start at peak / 25 ...
ONE_CYCLE_FINAL_DIV_FACTOR = 1e4  # ... end at start / 1e4
ONE_CYCLE_EXTRA_STEPS = 100  # RAFT's train.py builds OneCycleLR over num_steps + 100


def one_cycle_schedule(peak: float, total_steps: int, pct_start: float) -> optax.Schedule:
    """torch's two-phase linear OneCycleLR: peak/25 -> peak over ``pct_start`` of the steps, then down to
    peak/25/1e4 at step ``total_steps - 1`` (the same phase ends as torch computes them)."""
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"optim.pct_start must lie in (0, 1), got {pct_start}")
    initial = peak / ONE_CYCLE_DIV_FACTOR
    final = initial / ONE_CYCLE_FINAL_DIV_FACTOR
    rise_end = float(pct_start * total_steps) - 1.0
    fall_end = float(total_steps - 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rising = initial + (peak - initial) * step / max(rise_end, 1e-12)
        falling = peak + (final - peak) * (step - rise_end) / max(fall_end - rise_end, 1e-12)
        return jnp.where(step <= rise_end, rising, falling)

    return schedule


def low_lr_warmup_steps(optim: OptimConfig, trained_spec: dict[str, Any] | None) -> int:
    """Steps of low-rate warm-up the trained network (its model spec) gets: ``optim.low_lr_warmup_steps``
    for a CIFAR ResNet at least ``optim.low_lr_warmup_min_depth`` deep (or any network when that is 0)."""
    if optim.low_lr_warmup_min_depth == 0:
        return optim.low_lr_warmup_steps
    spec = trained_spec or {}
    depth = spec.get("kwargs", {}).get("depth", 0)
    deep = spec.get("arch") == "cifar_resnet" and depth >= optim.low_lr_warmup_min_depth
    return optim.low_lr_warmup_steps if deep else 0


def with_low_lr_warmup(schedule: optax.Schedule, steps: int, factor: float) -> optax.Schedule:
    """``schedule`` scaled by ``factor`` for steps [0, steps), unchanged from ``steps`` on."""
    if steps <= 0:
        return schedule

    def warmed(step):
        return jnp.where(jnp.asarray(step) < steps, factor, 1.0) * schedule(step)

    return warmed


def describe_schedule(optim: OptimConfig, trained_spec: dict[str, Any] | None = None) -> str:
    """One line for the start-up block: rate, schedule and whether this network gets the warm-up."""
    line = f"{optim.optimizer} lr {optim.learning_rate:g}, {optim.schedule}"
    if optim.schedule == "multistep":
        line += f" x{optim.decay_factor:g} at epochs {', '.join(f'{m:g}' for m in optim.milestones)}"
    warmup = low_lr_warmup_steps(optim, trained_spec)
    if warmup:
        line += (
            f"; low-rate warm-up: first {warmup} steps at lr {optim.learning_rate * optim.low_lr_warmup_factor:g}"
            f" (He et al. 2016)"
        )
    elif optim.low_lr_warmup_steps:
        line += f"; no low-rate warm-up (only for CIFAR ResNets of depth >= {optim.low_lr_warmup_min_depth})"
    return line


def make_schedule(
    optim: OptimConfig, steps_per_epoch: int, total_steps: int, trained_spec: dict[str, Any] | None = None
) -> optax.Schedule:
    """The rate per step; ``trained_spec`` (the trained network's model spec) decides the low-rate warm-up."""
    schedule = _base_schedule(optim, steps_per_epoch, total_steps)
    return with_low_lr_warmup(schedule, low_lr_warmup_steps(optim, trained_spec), optim.low_lr_warmup_factor)


def _base_schedule(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
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
    if optim.schedule == "one_cycle":
        return one_cycle_schedule(optim.learning_rate, total_steps + ONE_CYCLE_EXTRA_STEPS, optim.pct_start)
    raise ValueError(f"optim.schedule must be 'multistep', 'cosine', 'constant' or 'one_cycle', got {optim.schedule!r}")


def make_optimizer(optim: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``optim.optimizer`` on the scheduled rate, after optional global-norm clipping."""
    if optim.optimizer == "sgd":  # PyTorch's SGD: weight decay added to the gradient, then momentum
        step = optax.chain(
            optax.add_decayed_weights(optim.weight_decay),
            optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
        )
    elif optim.optimizer == "adamw":  # torch.optim.AdamW: decay decoupled from the adaptive step
        step = optax.adamw(schedule, b1=0.9, b2=0.999, eps=optim.adam_eps, weight_decay=optim.weight_decay)
    else:
        raise ValueError(f"optim.optimizer must be 'sgd' or 'adamw', got {optim.optimizer!r}")
    if optim.clip_norm is None:
        return step
    if optim.clip_norm <= 0:
        raise ValueError(f"optim.clip_norm must be > 0 (or None for no clipping), got {optim.clip_norm}")
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), step)
