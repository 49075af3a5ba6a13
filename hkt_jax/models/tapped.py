"""Any Linen module as a staged model, cut at named submodule calls ("taps").

``Tapped(module, taps=("layer1_0", "layer2_0"))`` follows the staged contract
(``hkt_jax.engine.stages``) without a line of staging code in ``module``: stage
``i`` ends where the submodule at ``taps[i]`` returns, the last stage ends with
the module's output. Paths are the ones ``capture_intermediates`` reports
(``available_taps`` lists them), e.g. ``"layer3_2"`` or
``"ResNetStage_2/BottleneckBlock_5"``. The variables are the wrapped module's
own tree (``nn.share_scope``), so checkpoints and converters do not change.

How a stage runs: the whole ``module`` forward is traced under one
``nn.intercept_methods`` interceptor that returns the handed-in features in
place of tap ``i - 1`` (the tapped submodule itself does not run) and reads
the output of tap ``i``. Everything a stage does not need is dead code that
XLA removes (``tests/test_tapped.py`` counts the convolutions in the compiled
HKT step: the same as with the hand-staged ResNet).

Stage outputs: every stage but the last returns ``{"input": x, "feature":
tap}``; later stages need the model input to run the forward up to the
replaced tap. For a sequential network that prefix is dead (free). For a
network whose later layers reuse earlier activations (U-Net skips), the prefix
is live: a stage recomputes, from the input, the layers its skips come from -
correct (they see the native activations, not mixed ones, as in the plain
forward), but they run again in every later stage of every stream (up to
n - 1 extra encoder passes for n stages, less where XLA's CSE merges identical
work). The engine mixes the ``"feature"`` leaf: build the HKT boundaries with
``tapped_boundaries`` (or name ``feature`` in your ``LeafLink``\\ s).

BatchNorm: a train-mode stage also runs layers outside the stage (prefix,
suffix). Only layers called after tap ``i - 1`` and up to tap ``i``'s return
keep their running-statistics updates; the others are restored, so every layer
is updated once per step, by its own stage.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
from hkt_jax.engine.stages import Boundary

INPUT, FEATURE = "input", "feature"  # the leaves of an intermediate stage output
STATE_COLLECTIONS = ("batch_stats",)  # what a stage may only update for its own layers

_BEFORE, _INSIDE, _AFTER = "before", "inside", "after"


def available_taps(module: nn.Module, *args: Any, rngs: Any = None, **kwargs: Any) -> dict[str, int]:
    """Every submodule-call path of ``module(*args, **kwargs)`` -> how often it is called,
    from one abstract (``jax.eval_shape``) ``capture_intermediates`` run."""
    rngs = rngs if rngs is not None else {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)

    def dry_run(*inputs):
        _, state = module.init_with_output(rngs, *inputs, capture_intermediates=True, **kwargs)
        return state.get("intermediates", {})

    counts: dict[str, int] = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if key == "__call__":
                if prefix:
                    counts["/".join(prefix)] = len(value)
            else:
                walk(value, (*prefix, key))

    walk(jax.eval_shape(dry_run, *specs), ())
    return counts


class _TapRun:
    """The interceptor for one forward: replaces tap ``write``, reads tap ``read``,
    counts every submodule call and keeps outside-stage layers' state unchanged."""

    def __init__(
        self,
        root: tuple[str, ...],
        taps: Sequence[str],
        *,
        write: str | None = None,
        value: Any = None,
        read: str | None = None,
        protect_state: bool = False,
    ):
        self.root, self.taps = root, set(taps)
        self.write, self.value, self.read = write, value, read
        self.protect_state = protect_state
        self.phase = _BEFORE if write is not None else _INSIDE
        self.captured: Any = None
        self.calls: dict[str, int] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # tap -> (call index at entry, at exit)
        self._clock = 0

    def __call__(self, next_fun, args, kwargs, context):
        module_path = tuple(context.module.path)
        if context.method_name != "__call__" or module_path[: len(self.root)] != self.root:
            return next_fun(*args, **kwargs)
        path = "/".join(module_path[len(self.root) :])
        if not path:  # the wrapped module itself (it shares the Tapped scope)
            return next_fun(*args, **kwargs)
        self.calls[path] = self.calls.get(path, 0) + 1
        if path in self.taps and self.calls[path] > 1:
            raise ValueError(
                f"Tapped: tap {path!r} is ambiguous: the forward calls that submodule more than once "
                "(a shared module or one inside a loop); tap a submodule that runs once per forward"
            )
        entry = self._clock = self._clock + 1
        if path == self.write:
            self.phase = _INSIDE
            out = self.value
        elif self.protect_state and self.phase != _INSIDE:
            out = _call_keeping_state(next_fun, args, kwargs, context.module)
        else:
            out = next_fun(*args, **kwargs)
        self._clock += 1
        if path in self.taps:
            self.spans[path] = (entry, self._clock)
        if path == self.read:
            _check_arrays(path, out)
            self.captured, self.phase = out, _AFTER
        return out


def _call_keeping_state(next_fun, args, kwargs, module: nn.Module):
    """Run a submodule call, then put its own (direct) state variables back as they were."""
    saved = {}
    for collection in STATE_COLLECTIONS:
        if module.is_mutable_collection(collection):
            own = module.variables.get(collection, {})
            saved[collection] = {name: value for name, value in own.items() if not isinstance(value, dict)}
    out = next_fun(*args, **kwargs)
    for collection, variables in saved.items():
        for name, value in variables.items():
            module.put_variable(collection, name, value)
    return out


def _check_arrays(path: str, out: Any) -> None:
    bad = [type(leaf).__name__ for leaf in jax.tree.leaves(out) if not isinstance(leaf, jax.Array)]
    if bad or not jax.tree.leaves(out):
        raise TypeError(
            f"Tapped: the output of tap {path!r} must be an array or a pytree of arrays (mixed leaf by "
            f"leaf), got {type(out).__name__} with non-array leaves {bad or '(none at all)'}"
        )


class Tapped(nn.Module):
    """``module`` staged at the outputs of the submodule calls ``taps`` (in call order).

    ``names``: the stage names (default: the tap paths, then ``"output"``); a
    parent and its child must share them. ``train_arg``: the keyword that puts
    ``module`` in training mode (``None`` if it takes none).
    """

    module: nn.Module
    taps: Sequence[str]
    names: Sequence[str] | None = None
    train_arg: str | None = "train"

    def setup(self):
        taps = () if isinstance(self.taps, str) else tuple(self.taps)
        if not taps or not all(isinstance(t, str) and t.strip("/") for t in taps):
            raise ValueError(
                f"Tapped: `taps` must be a sequence of submodule paths like ('layer2_0',), got {self.taps!r}"
            )
        if len(set(taps)) != len(taps):
            raise ValueError(f"Tapped: `taps` names a path twice: {taps!r}")
        if self.names is not None and len(self.names) != len(taps) + 1:
            raise ValueError(
                f"Tapped: {len(taps)} taps make {len(taps) + 1} stages, but `names` has "
                f"{len(self.names)}: {tuple(self.names)!r}"
            )
        nn.share_scope(self, self.module)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.names) if self.names is not None else (*self.taps, "output")

    def _forward(self, x, train: bool, run: _TapRun):
        kwargs = {self.train_arg: train} if self.train_arg else {}
        with nn.intercept_methods(run):
            out = self.module(x, **kwargs)
        return out

    def _check_taps(self, run: _TapRun, x, train: bool, needed: Sequence[str]) -> None:
        missing = [tap for tap in needed if tap not in run.calls]
        if missing:
            kwargs = {self.train_arg: False} if self.train_arg else {}
            available = available_taps(self.module.clone(parent=None), x, **kwargs)
            raise ValueError(
                f"Tapped: no submodule call at {missing!r} in {type(self.module).__name__}; "
                f"available paths: {sorted(available)}"
            )

    def __call__(self, x, train: bool = False):
        """The plain forward; checks once that the taps exist and follow the call order."""
        run = _TapRun(self.path, self.taps)
        out = self._forward(x, train, run)
        self._check_taps(run, x, train, self.taps)
        for before, after in zip(self.taps, self.taps[1:]):
            if run.spans[before][1] > run.spans[after][0]:
                raise ValueError(
                    f"Tapped: taps must be listed in the order the forward calls them, and not "
                    f"nested: {after!r} starts before {before!r} returns"
                )
        return out

    def stage(self, index: int, x, *, train: bool):
        if not 0 <= index < len(self.stage_names):
            raise ValueError(f"Tapped: stage index {index} out of range for stages {self.stage_names}")
        last = index == len(self.taps)
        if index == 0:
            model_input, write, value = x, None, None
        else:
            if not isinstance(x, dict) or set(x) != {INPUT, FEATURE}:
                raise TypeError(
                    f"Tapped: stage {index} takes the previous stage's output "
                    f"{{{INPUT!r}: model input, {FEATURE!r}: features}}, got {type(x).__name__}"
                )
            model_input, write, value = x[INPUT], self.taps[index - 1], x[FEATURE]
        read = None if last else self.taps[index]
        run = _TapRun(self.path, self.taps, write=write, value=value, read=read, protect_state=train)
        out = self._forward(model_input, train, run)
        self._check_taps(run, model_input, train, [t for t in (write, read) if t is not None])
        return out if last else {INPUT: model_input, FEATURE: run.captured}


def tapped_boundaries(child: nn.Module, parent: nn.Module, boundaries: Sequence[Any] | None = None):
    """HKT boundaries whose wires read and write the ``"feature"`` leaf of tapped stage outputs.

    ``boundaries``: the ``hkt_jax.engine.hkt.Boundary`` entries to adapt (default: every
    boundary, both directions); leaf paths in them are relative to the tap output.
    """

    def under(path: str, tapped: bool) -> str:
        return "/".join(p for p in (FEATURE if tapped else "", path) if p)

    child_tapped, parent_tapped = isinstance(child, Tapped), isinstance(parent, Tapped)
    if boundaries is None:
        boundaries = (Boundary(),) * (len(child.stage_names) - 1)
    adapted = []
    for b in boundaries:
        to_child = tuple(
            dataclasses.replace(
                link,
                receiver=under(link.receiver, child_tapped),
                sources=tuple(under(s, parent_tapped) for s in link.sources),
            )
            for link in b.to_child
        )
        to_parent = tuple(
            dataclasses.replace(
                link,
                receiver=under(link.receiver, parent_tapped),
                sources=tuple(under(s, child_tapped) for s in link.sources),
            )
            for link in b.to_parent
        )
        adapted.append(dataclasses.replace(b, to_child=to_child, to_parent=to_parent))
    return tuple(adapted)
