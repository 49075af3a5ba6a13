"""Training methods as loss functions with one signature.

``loss_fn(params, batch_stats, parent_variables, batch) -> (loss, aux)`` with
``aux = {"batch_stats", "metrics", "outputs"}``. ``params`` / ``batch_stats``
hold the trained network under ``"child"`` (plus ``"adapters"`` for HKT);
``metrics`` always carries ``loss``, ``l1``, ``l2``, ``l3`` so every run logs
the same columns (for baselines l2 is the task loss and l1 = l3 = 0). Which
losses those are comes from the run's Task.

* ``child`` / ``parent``: plain training of one network on the task loss.
* ``kd``: distillation from the frozen parent's outputs (the task's ``distill_loss``).
* ``hkt``: the three-stream HKT loss (hkt_jax.hkt).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hkt_jax.hkt import HKT
from hkt_jax.tasks import Task

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]
METHODS = ("hkt", "child", "kd", "parent")
NEEDS_PARENT = ("hkt", "kd")


def child_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    """The trained network's own variables, in the form ``model.apply`` takes."""
    variables = {"params": params["child"]}
    if batch_stats.get("child"):
        variables["batch_stats"] = batch_stats["child"]
    return variables


def trainable_variables(variables: Any) -> dict[str, Any]:
    """A network's own variables -> the trainable form the losses and train state use (inverse of
    ``child_variables``)."""
    return {"params": {"child": variables["params"]}, "batch_stats": {"child": variables.get("batch_stats", {})}}


def _forward_train(model: nn.Module, params, batch_stats, x, train: bool = True):
    """``train=False``: normalisation from (and keeping) the running statistics - RAFT's frozen BatchNorm."""
    variables = child_variables(params, batch_stats)
    if "batch_stats" not in variables or not train:
        return model.apply(variables, x, train=train), batch_stats
    outputs, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return outputs, {"child": mutated["batch_stats"]}


def plain_loss(model: nn.Module, task: Task, *, train: bool = True) -> LossFn:
    def loss_fn(params, batch_stats, parent_variables, batch):
        del parent_variables
        outputs, new_stats = _forward_train(model, params, batch_stats, task.model_input(batch), train)
        loss = task.task_loss(outputs, batch)
        zero = jnp.zeros_like(loss)
        metrics = {"loss": loss, "l1": zero, "l2": loss, "l3": zero}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "outputs": outputs}

    return loss_fn


def kd_loss(model: nn.Module, parent: nn.Module, task: Task, *, temperature: float, weight: float,
            train: bool = True) -> LossFn:
    """The task's distillation loss from the frozen parent; l2 logs the task term, l3 the KD term."""
    if temperature <= 0:
        raise ValueError(f"kd.temperature must be > 0, got {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"kd.weight must lie in [0, 1], got {weight}")

    def loss_fn(params, batch_stats, parent_variables, batch):
        x = task.model_input(batch)
        outputs, new_stats = _forward_train(model, params, batch_stats, x, train)
        frozen = jax.tree.map(jax.lax.stop_gradient, parent_variables)
        teacher = parent.apply(frozen, x, train=False)
        loss, terms = task.distill_loss(outputs, teacher, batch, temperature=temperature, weight=weight)
        metrics = {"loss": loss, "l1": jnp.zeros_like(loss), **terms}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "outputs": outputs}

    return loss_fn


def hkt_loss(engine: HKT, *, train: bool = True) -> LossFn:
    def loss_fn(params, batch_stats, parent_variables, batch):
        return engine.loss(params, batch_stats, parent_variables, batch, train=train)

    return loss_fn
