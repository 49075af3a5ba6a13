"""Training methods as loss functions with one signature.

``loss_fn(params, batch_stats, parent_variables, batch) -> (loss, aux)`` with
``aux = {"batch_stats", "metrics", "logits"}``. ``params`` / ``batch_stats``
hold the trained network under ``"child"`` (plus ``"adapters"`` for HKT);
``metrics`` always carries ``loss``, ``l1``, ``l2``, ``l3`` so every run logs
the same columns (for baselines l2 is the task loss and l1 = l3 = 0).

* ``child`` / ``parent``: plain cross-entropy training of one network.
* ``kd``: Hinton et al. (2015) distillation from the frozen parent's logits.
* ``hkt``: the three-stream HKT loss (hkt_jax.hkt).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hkt_jax.hkt import HKT, classification_ce

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]


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


def _forward_train(model: nn.Module, params, batch_stats, x):
    variables = child_variables(params, batch_stats)
    if "batch_stats" not in variables:
        return model.apply(variables, x, train=True), batch_stats
    logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, {"child": mutated["batch_stats"]}


def plain_loss(model: nn.Module) -> LossFn:
    def loss_fn(params, batch_stats, parent_variables, batch):
        del parent_variables
        logits, new_stats = _forward_train(model, params, batch_stats, batch["image"])
        loss = classification_ce(logits, batch)
        zero = jnp.zeros_like(loss)
        metrics = {"loss": loss, "l1": zero, "l2": loss, "l3": zero}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "logits": logits}

    return loss_fn


def kd_loss(model: nn.Module, parent: nn.Module, *, temperature: float, weight: float) -> LossFn:
    """(1 - w) CE(student) + w T^2 KL(softmax(t/T) || softmax(s/T)); l3 logs the KL term."""
    if temperature <= 0:
        raise ValueError(f"kd.temperature must be > 0, got {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"kd.weight must lie in [0, 1], got {weight}")

    def loss_fn(params, batch_stats, parent_variables, batch):
        logits, new_stats = _forward_train(model, params, batch_stats, batch["image"])
        frozen = jax.tree.map(jax.lax.stop_gradient, parent_variables)
        teacher = parent.apply(frozen, batch["image"], train=False).astype(jnp.float32)
        ce = classification_ce(logits, batch)
        teacher_probs = jax.nn.softmax(teacher / temperature)
        kl = jnp.mean(
            optax.softmax_cross_entropy(logits.astype(jnp.float32) / temperature, teacher_probs)
            - optax.softmax_cross_entropy(teacher / temperature, teacher_probs)
        ) * temperature**2
        loss = (1.0 - weight) * ce + weight * kl
        metrics = {"loss": loss, "l1": jnp.zeros_like(loss), "l2": ce, "l3": kl}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "logits": logits}

    return loss_fn


def hkt_loss(engine: HKT) -> LossFn:
    def loss_fn(params, batch_stats, parent_variables, batch):
        return engine.loss(params, batch_stats, parent_variables, batch, train=True)

    return loss_fn
