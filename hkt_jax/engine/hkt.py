"""The n-stage HKT engine (paper Algorithm 1) and its three-term loss (Eq. 9).

Three streams run through a staged child C = (c_1..c_n) and a frozen staged
parent P = (p_1..p_n):

* native:     z_n = c_n(...c_1(x))                        -> L2 = task loss
  (or, with ``native_distill``, a loss of z_n and the parent's own output p_n(...p_1(x)), e.g. KD's)
* backbone:   z*_{i+1} = c_{i+1}(z_i + lam GA(tau_c(z~_i), z_i))   -> L1 on z*_n
* head:       z~*_{i+1} = p_{i+1}(z~_i + lam GA(tau_p(z_i), z~_i)) -> L3 on z~*_n

The backbone and head streams feed each other at every boundary (Algorithm 1,
lines 6-10). Either direction can be switched off per boundary (the paper's
ablations). Boundary ``i`` sits after stage ``i`` (0-based), so n stages have
n - 1 boundaries. The first stage's output is shared by all child streams.

The parent is frozen: its variables pass through ``stop_gradient`` and it runs
in inference mode, but gradients still flow *through* its later stages into the
child (head inheritance). Trainable: the child and the Transfer adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import chex
import flax.linen as nn
import jax

from hkt_jax.engine import ga
from hkt_jax.engine.etm import Extractor, Transfer, get_leaf, set_leaf
from hkt_jax.engine.stages import Boundary, LeafLink, apply_stage, check_staged

LossFn = Callable[[Any, dict[str, jax.Array]], jax.Array]
# (child's native outputs, parent's native outputs, batch) -> L2
DistillFn = Callable[[Any, Any, dict[str, jax.Array]], jax.Array]
DIRECTIONS = ("to_child", "to_parent")
# Which side's features head inheritance anchors its mixing on (see HKTConfig.head_anchor).
HEAD_ANCHORS = ("parent", "child")


# Names ``hkt.inherit_loss`` may take (the paper: MAE); which ones a run accepts is its task's
# ``inherit_loss(name)`` to decide ("seq": optical flow's sequence loss).
INHERIT_LOSSES = ("mae", "ce", "seq")


@dataclasses.dataclass(frozen=True)
class HKTConfig:
    """The engine's settings; the defaults are the paper's (Table 2 setting, Eq. 9)."""

    lam: float = 0.6
    mode: ga.Mode = "auto"
    chunk_size: int | None = None
    impl: ga.Impl = "auto"  # softmax GA implementation (see hkt_jax.engine.ga.resolve_impl)
    alphas: tuple[float, float, float] = (0.25, 0.5, 0.25)
    inherit_loss: Literal["mae", "ce", "seq"] = "mae"
    # Head inheritance (child -> parent) mixing. "parent": Eq. 7, the parent's features are the query and
    # the child's are inherited, phi = p + lam GA(tau(c), p) (gate form: p + lam (1 - a)(tau(c) - p)).
    # "child": the authors' released code (``parent_child_attention(out2_h, out_2)``), anchored on the
    # child in both directions, phi = tau(c) + lam GA(p, tau(c)): with the gate near 1 the parent's head
    # then sees roughly the child's own features, and L3 sends the child a full gradient.
    head_anchor: Literal["parent", "child"] = "parent"
    # Per boundary on/off switches (empty = on at every boundary): the paper's ablations.
    backbone: tuple[bool, ...] = ()
    head: tuple[bool, ...] = ()
    # Leaf wiring per boundary (None = whole stage outputs, both directions); not a command-line setting.
    boundaries: tuple[Boundary, ...] | None = dataclasses.field(default=None, metadata={"cli": False})

    def __post_init__(self):
        ga.check_lam(self.lam)
        if self.mode not in ga.MODES:
            raise ValueError(f"hkt.mode={self.mode!r}: expected one of {ga.MODES}")
        if self.impl not in ga.IMPLS:
            raise ValueError(f"hkt.impl={self.impl!r}: expected one of {ga.IMPLS}")
        if self.inherit_loss not in INHERIT_LOSSES:
            raise ValueError(f"hkt.inherit_loss={self.inherit_loss!r}: expected one of {INHERIT_LOSSES}")
        if self.head_anchor not in HEAD_ANCHORS:
            raise ValueError(f"hkt.head_anchor={self.head_anchor!r}: expected one of {HEAD_ANCHORS}")
        validate_alphas(self.alphas)

    def resolved_boundaries(self, num_stages: int) -> tuple[Boundary, ...]:
        """One Boundary per stage boundary, with the backbone/head switches applied."""
        count = num_stages - 1
        boundaries = self.boundaries if self.boundaries is not None else (Boundary(),) * count
        if len(boundaries) != count:
            raise ValueError(
                f"config.boundaries has {len(boundaries)} entries, but {num_stages} stages have {count} boundaries"
            )
        for name in ("backbone", "head"):
            flags = getattr(self, name)
            if flags and len(flags) != count:
                raise ValueError(f"hkt.{name} has {len(flags)} entries; this stage split has {count} boundaries")
            if flags:
                boundaries = tuple(dataclasses.replace(b, **{name: bool(f)}) for b, f in zip(boundaries, flags))
        return tuple(boundaries)


def validate_alphas(alphas: Sequence[float]) -> tuple[float, float, float]:
    """Eq. 9's constraints: each in [0, 1], max(a1, a3) <= a2, sum = 1."""
    alphas = tuple(float(a) for a in alphas)
    if len(alphas) != 3:
        raise ValueError(f"hkt.alphas must be three weights (a1, a2, a3), got {alphas}")
    a1, a2, a3 = alphas
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"hkt.alphas must each lie in [0, 1], got {alphas}")
    if max(a1, a3) > a2 + 1e-9:
        raise ValueError(f"hkt.alphas must satisfy max(a1, a3) <= a2 (native loss dominates), got {alphas}")
    if abs(sum(alphas) - 1.0) > 1e-6:
        raise ValueError(f"hkt.alphas must sum to 1, got {alphas} (sum {sum(alphas)})")
    return alphas


def _adapter_key(direction: str, boundary: int, link: LeafLink) -> str:
    """A flat, checkpoint-safe name, e.g. ``to_child_0`` or ``to_parent_1_hidden``."""
    leaf = link.receiver.replace("/", "_")
    return f"{direction}_{boundary}" + (f"_{leaf}" if leaf else "")


class HKT:
    """HKT over a staged (child, parent) pair. Pure functions of explicit variables.

    Trainable variables are ``{"params": {"child": ..., "adapters": ...},
    "batch_stats": {"child": ...}}``; the parent's variables are passed to
    every call and are never returned, updated or differentiated.
    """

    def __init__(
        self,
        child: nn.Module,
        parent: nn.Module,
        config: HKTConfig = HKTConfig(),
        *,
        task: Any,
        task_loss: LossFn | None = None,
        inherit_loss: LossFn | None = None,
        native_distill: DistillFn | None = None,
    ):
        """``task`` (a ``hkt_jax.tasks.Task``, e.g. ``Classification()``) supplies the network input of a
        batch and the losses; ``task_loss`` / ``inherit_loss`` override its losses. ``native_distill``
        replaces L2 by a loss that also sees the frozen parent's own outputs (KD's soft targets, say);
        the parent's native pass reuses its first stage, already run for the head stream."""
        check_staged(child, "child")
        check_staged(parent, "parent")
        if tuple(child.stage_names) != tuple(parent.stage_names):
            raise ValueError(
                f"child and parent must share stage names, got child {tuple(child.stage_names)} "
                f"and parent {tuple(parent.stage_names)}"
            )
        if len(child.stage_names) < 2:
            raise ValueError(f"HKT needs at least 2 stages (one boundary), got {tuple(child.stage_names)}")
        self.child, self.parent, self.config, self.task = child, parent, config, task
        self.boundaries = config.resolved_boundaries(len(child.stage_names))
        self.task_loss = task_loss or task.task_loss
        self.inherit_loss = inherit_loss or task.inherit_loss(config.inherit_loss)
        self.native_distill = native_distill
        self._transfer = Transfer()

    @property
    def num_stages(self) -> int:
        return len(self.child.stage_names)

    # -- initialisation ---------------------------------------------------------------------------

    def init(self, rng: jax.Array, x: Any, parent_variables: Any) -> dict[str, Any]:
        """Child variables plus one Transfer adapter per active wire (shapes read off ``x``)."""
        child_rng, adapter_rng = jax.random.split(rng)
        child_vars = dict(self.child.init(child_rng, x, train=False))
        adapters: dict[str, Any] = {}

        def init_adapter(direction, boundary, link, giving, receiving):
            z = Extractor(link.sources, link.combine).apply({}, giving)
            like = get_leaf(receiving, link.receiver)
            self._check_features(direction, boundary, link, z, like)
            key = _adapter_key(direction, boundary, link)
            adapter_vars = self._transfer.init(jax.random.fold_in(adapter_rng, len(adapters)), z, like)
            adapters[key] = dict(adapter_vars.get("params", {}))

        zc = zp = x
        for i in range(self.num_stages - 1):
            zc, _ = apply_stage(self.child, child_vars, i, zc, train=False)
            zp, _ = apply_stage(self.parent, parent_variables, i, zp, train=False)
            for direction, giving, receiving in (("to_child", zp, zc), ("to_parent", zc, zp)):
                for link in self._links(i, direction):
                    init_adapter(direction, i, link, giving, receiving)
        return {
            "params": {"child": child_vars["params"], "adapters": adapters},
            "batch_stats": {"child": child_vars.get("batch_stats", {})},
        }

    def _check_features(self, direction: str, boundary: int, link: LeafLink, giving: Any, receiving: Any) -> str:
        """Both sides of a wire are feature arrays (B, [*spatial,] C); an error names the boundary and leaf.
        Returns that name for later checks."""
        where = (
            f"HKT boundary {boundary} (after stage {self.child.stage_names[boundary]!r}), {direction}, "
            f"{'leaf ' + repr(link.receiver) if link.receiver else 'the whole stage output'}"
        )
        chex.assert_rank(
            [giving, receiving], {2, 3, 4, 5}, custom_message=f"{where}: features must be (B, [*spatial,] C)"
        )
        return where

    def _links(self, boundary: int, direction: str) -> tuple[LeafLink, ...]:
        b = self.boundaries[boundary]
        active = b.backbone if direction == "to_child" else b.head
        return (b.to_child if direction == "to_child" else b.to_parent) if active else ()

    # -- forward ----------------------------------------------------------------------------------

    def _mix(self, adapters, direction, boundary, giving, receiving, metrics):
        for link in self._links(boundary, direction):
            key = _adapter_key(direction, boundary, link)
            z = Extractor(link.sources, link.combine).apply({}, giving)
            target = get_leaf(receiving, link.receiver)
            where = self._check_features(direction, boundary, link, z, target)
            tau = self._transfer.apply({"params": adapters[key]} if adapters[key] else {}, z, target)
            chex.assert_equal_shape([tau, target], custom_message=f"{where}: Transfer did not align the features")
            query, inherited = target, tau.astype(target.dtype)
            if direction == "to_parent" and self.config.head_anchor == "child":
                query, inherited = inherited, target  # the released code: the child's features are the query
            mixed, diagnostic = ga.etm_mix_with_diagnostic(
                query,
                inherited,
                lam=self.config.lam,
                mode=self.config.mode,
                chunk_size=self.config.chunk_size,
                impl=self.config.impl,
            )
            is_gate = ga.resolve_mode(self.config.mode, target.ndim) == "gate"
            metrics[f"{'gate' if is_gate else 'ga_ratio'}/{key}"] = diagnostic
            receiving = set_leaf(receiving, link.receiver, mixed)
        return receiving

    def forward(self, variables: dict[str, Any], parent_variables: Any, x: Any, *, train: bool):
        """All three streams. Returns (outputs, new child batch_stats, diagnostics).

        ``outputs`` = {"native": z_n, "backbone": z*_n, "head": z~*_n}, plus "parent" (the parent's
        own outputs) when L2 distils from them. In train
        mode the child's BatchNorm uses batch statistics in every stream, and its
        running averages are updated from the native stream only (the child
        runs alone at inference).
        """
        params = variables["params"]
        child_vars = {"params": params["child"], "batch_stats": variables["batch_stats"]["child"]}
        if not child_vars["batch_stats"]:
            del child_vars["batch_stats"]
        frozen_parent = jax.tree.map(jax.lax.stop_gradient, parent_variables)
        metrics: dict[str, jax.Array] = {}

        z_native, stats = apply_stage(self.child, child_vars, 0, x, train=train, update_stats=True)
        z_child = z_native
        for i in range(1, self.num_stages):
            vars_i = {**child_vars, "batch_stats": stats} if stats is not None else child_vars
            z_native, stats = apply_stage(self.child, vars_i, i, z_native, train=train, update_stats=True)
        new_stats = stats if stats is not None else child_vars.get("batch_stats", {})

        # The inherited streams reuse the child's stage-0 output (same params, same batch).
        z_parent, _ = apply_stage(self.parent, frozen_parent, 0, x, train=False)
        outputs = {}
        if self.native_distill is not None:  # the parent alone, from the stage-0 output the head stream starts from
            z_teacher = z_parent
            for i in range(1, self.num_stages):
                z_teacher, _ = apply_stage(self.parent, frozen_parent, i, z_teacher, train=False)
            outputs["parent"] = z_teacher
        for i in range(self.num_stages - 1):
            phi_child = self._mix(params["adapters"], "to_child", i, z_parent, z_child, metrics)
            phi_parent = self._mix(params["adapters"], "to_parent", i, z_child, z_parent, metrics)
            z_child, _ = apply_stage(self.child, child_vars, i + 1, phi_child, train=train)
            z_parent, _ = apply_stage(self.parent, frozen_parent, i + 1, phi_parent, train=False)
        outputs.update(native=z_native, backbone=z_child, head=z_parent)
        return outputs, {"child": new_stats}, metrics

    # -- loss -------------------------------------------------------------------------------------

    def loss(self, params, batch_stats, parent_variables, batch, *, train: bool = True):
        """L = a1 L1 + a2 L2 + a3 L3. Returns (loss, aux) with aux = {"batch_stats",
        "metrics" (loss, l1, l2, l3, GA diagnostics), "outputs" (the native stream's)}.

        All three terms are always computed and logged; a term with weight 0
        is left out of the sum, so it contributes no gradient (not even 0 * NaN).
        """
        outputs, new_stats, metrics = self.forward(
            {"params": params, "batch_stats": batch_stats}, parent_variables, self.task.model_input(batch), train=train
        )
        a1, a2, a3 = self.config.alphas
        l1 = self.inherit_loss(outputs["backbone"], batch)
        if self.native_distill is not None:
            l2 = self.native_distill(outputs["native"], outputs["parent"], batch)
        else:
            l2 = self.task_loss(outputs["native"], batch)
        l3 = self.inherit_loss(outputs["head"], batch)
        total = sum(a * term for a, term in ((a1, l1), (a2, l2), (a3, l3)) if a != 0.0)
        metrics.update(loss=total, l1=l1, l2=l2, l3=l3)
        return total, {"batch_stats": new_stats, "metrics": metrics, "outputs": outputs["native"]}
