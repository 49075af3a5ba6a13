"""RAFT and RAFT-S (Teed & Deng 2020) as staged Linen modules, numerically princeton-vl/RAFT.

``RAFT(small=False)``: BasicEncoder feature net (256 ch, instance norm), context
net (BatchNorm; hidden 128 + context 128), 4-level correlation pyramid of radius
4, separable ConvGRU, convex x8 upsampling. ``RAFT(small=True)``: SmallEncoder
feature net (128 ch, instance norm), context net without norm (hidden 96 +
context 64), radius 3, 3x3 ConvGRU, bilinear x8 upsampling.

Images are ``(B, H, W, 3)`` float in [0, 255] (normalised to [-1, 1] inside),
H and W multiples of 8; the output is every iteration's full-resolution flow,
``(iters, B, H, W, 2)`` float32, pixels (x, y).

Stages (the paper's three functional blocks), for the HKT engine:

0. ``"features"``: ``{"image1", "image2"}`` (the frames, as for ``__call__``)
   -> ``{"fmap1", "fmap2", "image1"}``: both frames' feature maps ``(B, H/8, W/8, 256|128)``
   and frame 1 normalised to [-1, 1] for the context net.
1. ``"context"``: -> ``{"fmap1", "fmap2", "net", "inp"}``: hidden state (tanh, 128|96 ch) and
   context input (ReLU, 128|64 ch).
2. ``"flow"``: -> flows ``(self.iters, B, H, W, 2)``; an optional ``"flow_init"`` entry
   ``(B, H/8, W/8, 2)`` starts the iterations from that coarse flow.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hkt_jax.models.raft_corr import CORR_IMPLS, build_corr, coords_grid
from hkt_jax.models.raft_encoders import Encoder
from hkt_jax.models.raft_update import RefinementStep
from hkt_jax.engine.stages import Boundary, LeafLink

NUM_LEVELS = 4
# The coarsest correlation level must keep at least one pixel: H/8 / 2**3 >= 1.
MIN_SIZE = 8 * 2 ** (NUM_LEVELS - 1)


def check_frames(image1: jax.Array, image2: jax.Array) -> None:
    """Frames RAFT can take: same shape ``(B, H, W, 3)``, H and W multiples of 8 and at least 64."""
    if image1.shape != image2.shape:
        raise ValueError(
            f"RAFT needs two frames of the same shape, got {tuple(image1.shape)} and {tuple(image2.shape)}"
        )
    if image1.ndim != 4 or image1.shape[-1] != 3:
        raise ValueError(f"RAFT takes frames of shape (B, H, W, 3), got {tuple(image1.shape)}")
    height, width = image1.shape[1:3]
    if height % 8 or width % 8:
        raise ValueError(
            f"RAFT needs H and W to be multiples of 8, got frames of shape {tuple(image1.shape)} "
            f"(H={height}, W={width}); pad them (e.g. estimate_flow's replicate padding)"
        )
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(
            f"RAFT needs frames of at least {MIN_SIZE}x{MIN_SIZE} (its correlation pyramid halves "
            f"H/8 and W/8 {NUM_LEVELS - 1} times), got {tuple(image1.shape)}"
        )


class RAFT(nn.Module):
    """RAFT / RAFT-S as three stages: ``features`` (both frames' feature maps), ``context`` (hidden state and
    context input) and ``flow`` (the refinement iterations, one ``nn.scan`` over a shared step).

    ``unroll``: the scan is fully unrolled by default. XLA:CPU runs the backward pass of a rolled scan
    7-9x slower (RAFT-S, 64x64 crops, batch 8, 12 iterations: 7.4 s vs 0.8 s per gradient, compile 17 s
    vs 27 s); ``unroll=1`` keeps the loop rolled (smaller programs, slower training)."""

    small: bool = False
    corr_impl: str = "all_pairs"  # or "on_the_fly": same flows, no N^2 volume (large frames)
    iters: int = 12  # iterations of the "flow" stage (``__call__`` takes its own)
    unroll: int | bool = True  # iterations per scan step (True: all; see above)
    dtype: Any = jnp.float32  # encoders and update block; correlation, coordinates and flows stay float32

    stage_names = ("features", "context", "flow")

    @property
    def hidden_dim(self) -> int:
        return 96 if self.small else 128

    @property
    def context_dim(self) -> int:
        return 64 if self.small else 128

    @property
    def radius(self) -> int:
        return 3 if self.small else 4

    def setup(self):
        if self.corr_impl not in CORR_IMPLS:
            raise ValueError(f"unknown corr_impl {self.corr_impl!r}; expected one of {CORR_IMPLS}")
        self.fnet = Encoder(128 if self.small else 256, "instance", self.small, self.dtype)
        self.cnet = Encoder(
            self.hidden_dim + self.context_dim, "none" if self.small else "batch", self.small, self.dtype
        )
        scan = nn.scan(
            RefinementStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            out_axes=0,
            unroll=self.unroll,
        )
        self.update_block = scan(self.small, self.radius, self.dtype)

    def features(self, image1: jax.Array, image2: jax.Array) -> dict[str, jax.Array]:
        check_frames(image1, image2)
        image1 = (2 * (jnp.asarray(image1, jnp.float32) / 255.0) - 1).astype(self.dtype)
        image2 = (2 * (jnp.asarray(image2, jnp.float32) / 255.0) - 1).astype(self.dtype)
        fmaps = self.fnet(jnp.concatenate([image1, image2]), train=False)  # instance norm: batch-independent
        fmap1, fmap2 = jnp.split(fmaps, 2)
        return {"fmap1": fmap1, "fmap2": fmap2, "image1": image1}

    def context(self, x: dict[str, jax.Array], *, train: bool) -> dict[str, jax.Array]:
        net, inp = jnp.split(self.cnet(x["image1"], train=train), [self.hidden_dim], axis=-1)
        return {"fmap1": x["fmap1"], "fmap2": x["fmap2"], "net": jnp.tanh(net), "inp": nn.relu(inp)}

    def flow(self, x: dict[str, Any], iters: int) -> jax.Array:
        fmap1, fmap2 = x["fmap1"].astype(jnp.float32), x["fmap2"].astype(jnp.float32)
        corr_state = build_corr(fmap1, fmap2, num_levels=NUM_LEVELS, impl=self.corr_impl)
        batch, height, width, _ = fmap1.shape
        coords0 = coords_grid(batch, height, width)
        coords1 = coords0 if x.get("flow_init") is None else coords0 + x["flow_init"]
        net = x["net"].astype(self.dtype)  # the scan carry keeps one dtype
        _, flows = self.update_block((net, coords1), jnp.arange(iters), corr_state, x["inp"], coords0)
        return flows

    def stage(self, index: int, x: Any, *, train: bool = False) -> Any:
        if index == 0:
            return self.features(x["image1"], x["image2"])
        if index == 1:
            return self.context(x, train=train)
        if index == 2:
            return self.flow(x, self.iters)
        raise IndexError(f"RAFT has stages 0..2 {self.stage_names}, got {index}")

    def hkt_boundaries(self, stages: int | None = None) -> tuple:
        """HKT wiring for a RAFT pair (any sizes: Transfer adapters bridge 256|128-ch features and
        128|96 hidden / 128|64 context channels). ``stages`` = 3 (default, the paper's 3HKT): mix both
        frames' features after ``features`` and hidden state + context input after ``context``;
        2 (2HKT): one boundary after the encoders, mixing all four (the first boundary stays idle)."""

        def links(*leaves):
            return tuple(LeafLink(leaf, (leaf,)) for leaf in leaves)

        features, context = links("fmap1", "fmap2"), links("net", "inp")
        if stages in (None, 3):
            return (Boundary(to_child=features, to_parent=features), Boundary(to_child=context, to_parent=context))
        if stages == 2:
            idle = Boundary(backbone=False, head=False, to_child=(), to_parent=())
            return (idle, Boundary(to_child=features + context, to_parent=features + context))
        raise ValueError(
            f"hkt.stages={stages}: RAFT supports 3 (3HKT: after features and context) or 2 (2HKT: after the encoders)"
        )

    def __call__(
        self,
        image1: Any,
        image2: jax.Array | None = None,
        *,
        iters: int | None = None,
        flow_init: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Both frames, or stage 0's input ``{"image1", "image2"}`` alone (what the training core passes);
        ``iters`` defaults to the module's ``iters``."""
        if image2 is None:
            image1, image2 = image1["image1"], image1["image2"]
        iters = self.iters if iters is None else iters
        x = self.context(self.features(image1, image2), train=train)
        return self.flow({**x, "flow_init": flow_init}, iters)
