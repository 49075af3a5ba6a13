"""The staged-model contract the HKT engine relies on, and the wiring between two staged models.

A staged model is a ``flax.linen.Module`` whose functional blocks form an
ordered list: ``stage_names`` names them, and ``stage(index, x, train=...)``
runs block ``index`` alone on the output of block ``index - 1`` (block 0 takes
the model input). ``__call__`` is simply all stages in order. A stage's output
may be any pytree (RAFT's encoders hand on several tensors). Parent and child
share stage names; aligned stages may differ in width and resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import flax.linen as nn

Variables = Any


@dataclasses.dataclass(frozen=True)
class LeafLink:
    """One inheritance wire at a boundary: ``sources`` of the giving stage's output
    (joined by ``combine``) are mixed into the ``receiver`` leaf of the receiving one.
    Paths: "" is the whole stage output, "a/b" a nested leaf."""

    receiver: str = ""
    sources: tuple[str, ...] = ("",)
    combine: Literal["single", "concat", "sum"] = "single"


@dataclasses.dataclass(frozen=True)
class Boundary:
    """What happens after one aligned stage pair."""

    backbone: bool = True  # parent -> child (feeds L1)
    head: bool = True  # child -> parent (feeds L3)
    to_child: tuple[LeafLink, ...] = (LeafLink(),)
    to_parent: tuple[LeafLink, ...] = (LeafLink(),)


@runtime_checkable
class StagedModel(Protocol):
    stage_names: Sequence[str]

    def stage(self, index: int, x: Any, *, train: bool) -> Any: ...


def check_staged(model: nn.Module, role: str) -> None:
    """Fail early, naming the model, when it does not follow the staged contract."""
    if not isinstance(model, StagedModel):
        raise TypeError(
            f"the {role} ({type(model).__name__}) must be a staged model: it needs a `stage_names` "
            "sequence and a `stage(index, x, *, train)` method (see hkt_jax.engine.stages)"
        )


def apply_stage(
    model: nn.Module,
    variables: Variables,
    index: int,
    x: Any,
    *,
    train: bool,
    update_stats: bool = False,
) -> tuple[Any, Variables | None]:
    """Run stage ``index`` of ``model``; returns (output, updated batch_stats or None).

    ``train`` picks batch statistics vs running averages in BatchNorm;
    ``update_stats`` (train only) also returns the updated running averages.
    """
    if train and update_stats and "batch_stats" in variables:
        out, mutated = model.apply(variables, index, x, train=True, method="stage", mutable=["batch_stats"])
        return out, mutated["batch_stats"]
    if train and "batch_stats" in variables:
        out, _ = model.apply(variables, index, x, train=True, method="stage", mutable=["batch_stats"])
        return out, None
    return model.apply(variables, index, x, train=train, method="stage"), None


def run_all_stages(model: nn.Module, variables: Variables, x: Any, *, train: bool = False) -> list[Any]:
    """Every stage's output, in order (inference helper for tests and tools)."""
    outputs = []
    for index in range(len(model.stage_names)):
        x, _ = apply_stage(model, variables, index, x, train=train)
        outputs.append(x)
    return outputs
