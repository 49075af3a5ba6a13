"""Training methods as loss functions with one signature.

``loss_fn(params, batch_stats, parent_variables, batch) -> (loss, aux)`` with
``aux = {"batch_stats", "metrics", "outputs"}``. ``params`` / ``batch_stats``
hold the trained network under ``"child"`` (plus ``"adapters"`` for HKT);
``metrics`` always carries ``loss``, ``l1``, ``l2``, ``l3`` so every run logs
the same columns (for baselines l2 is the task loss and l1 = l3 = 0). Which
losses those are comes from the run's Task.

* ``child`` / ``parent``: plain training of one network on the task loss.
* ``kd``: distillation from the frozen parent's outputs (the task's ``distill_loss``).
* ``fitnet``: FitNets' hint (Romero et al., ICLR 2015) as the one-stage baseline of CRD's benchmark
  (Tian et al., ICLR 2020): CE + weight * MSE(r(child features), parent features) at one stage end,
  r a trainable 1x1 conv (child width -> parent width; not exported, like HKT's adapters).
* ``at``: activation-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, p = 2, beta = 1000):
  CE + beta/2 * sum over stage ends of mean((Q_s/||Q_s|| - Q_t/||Q_t||)^2), Q = mean over channels of |A|^p.
* ``hkt``: the three-stream HKT loss (hkt_jax.engine.hkt).

fitnet and at read the features at every stage end but the last (CifarResNet's ``groups`` split: the
ends of the three residual groups, 32x32x16, 16x16x32, 8x8x64); they need spatial maps - on the pooled
vector that the paper's split mixes at, attention transfer is identically zero and a hint is no hint.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from hkt_jax.engine.hkt import HKT
from hkt_jax.engine.stages import apply_stage
from hkt_jax.tasks import Task
from hkt_jax.tasks.registry import feature_distillation_tasks

LossFn = Callable[..., tuple[jax.Array, dict[str, Any]]]
METHODS = ("hkt", "child", "kd", "fitnet", "at", "parent")
NEEDS_PARENT = ("hkt", "kd", "fitnet", "at")
FEATURE_METHODS = ("fitnet", "at")  # distil from the parent's features at the stage ends
FEATURE_STAGE_SPLIT = "groups"  # ... which CifarResNet's "groups" split puts at its residual-group ends
REGRESSOR_KEY = "fitnet_regressor"  # under params["adapters"]


def stage_split_for(method: str, hkt_stage_split: str) -> str:
    """The stage split a method's models are built with: HKT's setting, the group ends for fitnet / at,
    and the paper's split (the models run whole) otherwise."""
    if method == "hkt":
        return hkt_stage_split
    return FEATURE_STAGE_SPLIT if method in FEATURE_METHODS else "paper"


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


def kd_loss(
    model: nn.Module, parent: nn.Module, task: Task, *, temperature: float, weight: float, train: bool = True
) -> LossFn:
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


# -- feature distillation: FitNets and attention transfer --------------------------------------------


def attention_map(features: jax.Array, p: float = 2.0) -> jax.Array:
    """(B, *spatial, C) -> (B, N): mean over channels of |A|^p, flattened and L2-normalised per example
    (Zagoruyko & Komodakis' ``F.normalize(x.pow(p).mean(1).view(B, -1))``, in float32)."""
    q = jnp.mean(jnp.abs(features.astype(jnp.float32)) ** p, axis=-1).reshape(features.shape[0], -1)
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def attention_transfer_loss(student: jax.Array, teacher: jax.Array, p: float = 2.0) -> jax.Array:
    """Mean over examples and positions of the squared difference of the two normalised attention maps
    (the authors' ``at_loss``; the paper's beta/2 and the sum over groups are the caller's)."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"attention transfer needs equal batch and spatial sizes, got student {student.shape} "
            f"and teacher {teacher.shape}"
        )
    return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def hint_loss(regressed: jax.Array, hint: jax.Array) -> jax.Array:
    """FitNets' hint loss as CRD's benchmark computes it: mean squared error over every element."""
    return jnp.mean((regressed.astype(jnp.float32) - hint.astype(jnp.float32)) ** 2)


class HintRegressor(nn.Module):
    """FitNets' regressor on the child side: a 1x1 convolution (with bias) to the parent's width."""

    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (1, 1), name="conv")(x)


def run_stages(model: nn.Module, params, batch_stats, x, *, train: bool):
    """Every stage output of the trained network, stage by stage as the HKT engine's native stream runs it
    (BatchNorm statistics updated in train mode); returns (outputs, new batch_stats)."""
    variables = child_variables(params, batch_stats)
    outputs, stats = [], None
    for index in range(len(model.stage_names)):
        current = {**variables, "batch_stats": stats} if stats is not None else variables
        x, stats = apply_stage(model, current, index, x, train=train, update_stats=True)
        outputs.append(x)
    return outputs, ({"child": stats} if stats is not None else batch_stats)


def parent_stage_outputs(parent: nn.Module, parent_variables, x) -> list[Any]:
    """Every stage output of the frozen parent (parameters under stop_gradient, inference mode)."""
    frozen = jax.tree.map(jax.lax.stop_gradient, parent_variables)
    outputs = []
    for index in range(len(parent.stage_names)):
        x, _ = apply_stage(parent, frozen, index, x, train=False)
        outputs.append(x)
    return outputs


def feature_points(
    method: str, model: nn.Module, parent: nn.Module, task: Task, child_outputs: list[Any], parent_outputs: list[Any]
) -> tuple[str, ...]:
    """The stage names whose outputs fitnet / at compare (every stage but the last), after checking that
    the task has feature maps to compare (``Task.feature_distillation``) and that those outputs are spatial maps
    of matching sizes."""
    if not task.feature_distillation:
        raise ValueError(
            f"method={method} is defined for tasks with feature_distillation only "
            f"(task={' or task='.join(feature_distillation_tasks())}), not {task.name!r}"
        )
    names = tuple(model.stage_names)
    if names != tuple(parent.stage_names):
        raise ValueError(
            f"method={method}: child and parent must share stage names, got {names} and {tuple(parent.stage_names)}"
        )
    if len(names) < 2:
        raise ValueError(f"method={method} needs at least one stage end before the head, got stages {names}")
    for name, mine, theirs in zip(names[:-1], child_outputs, parent_outputs):
        shapes = (getattr(mine, "shape", None), getattr(theirs, "shape", None))
        if any(s is None or len(s) != 4 for s in shapes):
            raise ValueError(
                f"method={method} needs (B, H, W, C) feature maps at the stage ends, but stage {name!r} gives child "
                f"{shapes[0]} and parent {shapes[1]}: build the models with stage_split={FEATURE_STAGE_SPLIT!r} "
                "(CifarResNet: the ends of its residual groups); on a pooled vector attention transfer is "
                "identically zero and a hint is no hint"
            )
        if shapes[0][1:3] != shapes[1][1:3]:
            raise ValueError(
                f"method={method}: at stage {name!r} the child's maps are {shapes[0][1:3]} and the "
                f"parent's {shapes[1][1:3]}; the feature losses compare them position by position"
            )
    return names[:-1]


def fitnet_loss(
    model: nn.Module,
    parent: nn.Module,
    task: Task,
    regressor: HintRegressor,
    *,
    stage_index: int,
    weight: float,
    train: bool = True,
) -> LossFn:
    """CE + weight * MSE(regressor(child features), parent features) at stage ``stage_index``'s end
    (the regressor's parameters: ``params["adapters"][REGRESSOR_KEY]``); l2 logs CE, l3 the unweighted hint loss."""
    if weight < 0:
        raise ValueError(f"fitnet.weight must be >= 0, got {weight}")

    def loss_fn(params, batch_stats, parent_variables, batch):
        x = task.model_input(batch)
        outputs, new_stats = run_stages(model, params, batch_stats, x, train=train)
        hint = parent_stage_outputs(parent, parent_variables, x)[stage_index]
        regressed = regressor.apply({"params": params["adapters"][REGRESSOR_KEY]}, outputs[stage_index])
        ce, hinted = task.task_loss(outputs[-1], batch), hint_loss(regressed, hint)
        loss = ce + weight * hinted
        metrics = {"loss": loss, "l1": jnp.zeros_like(loss), "l2": ce, "l3": hinted}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "outputs": outputs[-1]}

    return loss_fn


def at_loss(model: nn.Module, parent: nn.Module, task: Task, *, beta: float, p: float, train: bool = True) -> LossFn:
    """CE + beta/2 * sum over stage ends of ``attention_transfer_loss``; l2 logs CE, l3 the unweighted sum,
    ``at/<stage>`` each term."""
    if beta < 0:
        raise ValueError(f"at.beta must be >= 0, got {beta}")
    if p <= 0:
        raise ValueError(f"at.p must be > 0, got {p}")
    names = tuple(model.stage_names)[:-1]

    def loss_fn(params, batch_stats, parent_variables, batch):
        x = task.model_input(batch)
        outputs, new_stats = run_stages(model, params, batch_stats, x, train=train)
        teacher = parent_stage_outputs(parent, parent_variables, x)
        terms = {f"at/{name}": attention_transfer_loss(s, t, p) for name, s, t in zip(names, outputs, teacher)}
        ce, transferred = task.task_loss(outputs[-1], batch), sum(terms.values())
        loss = ce + beta / 2 * transferred
        metrics = {"loss": loss, "l1": jnp.zeros_like(loss), "l2": ce, "l3": transferred, **terms}
        return loss, {"batch_stats": new_stats, "metrics": metrics, "outputs": outputs[-1]}

    return loss_fn
