"""One RAFT refinement iteration (Sec. 3.3): correlation lookup, motion encoder, ConvGRU, flow head, upsampling.

:class:`RefinementStep` is the body :class:`~hkt_jax.models.raft.RAFT` scans over
(``nn.scan``, parameters shared by every iteration). Layer names follow
princeton-vl's ``update_block`` (``encoder.convc1``, ``gru.convz1``, ``mask``...).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hkt_jax.models.raft_corr import CorrState, lookup_corr, upsample_bilinear, upsample_convex

# princeton-vl's update block keeps PyTorch's default conv init (kaiming_uniform with a = sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(features: int, kernel: int | tuple[int, int], name: str, dtype: Any = jnp.float32) -> nn.Conv:
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return nn.Conv(
        features,
        (kh, kw),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        kernel_init=torch_default_init,
        dtype=dtype,
        name=name,
    )


class MotionEncoder(nn.Module):
    """Correlation features + current flow -> motion features (``out_dim - 2`` channels, then the flow)."""

    small: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, flow: jax.Array, corr: jax.Array) -> jax.Array:
        if self.small:
            cor = nn.relu(conv(96, 1, "convc1", self.dtype)(corr))
            flo = nn.relu(conv(64, 7, "convf1", self.dtype)(flow))
            flo = nn.relu(conv(32, 3, "convf2", self.dtype)(flo))
            out = nn.relu(conv(80, 3, "conv", self.dtype)(jnp.concatenate([cor, flo], axis=-1)))
        else:
            cor = nn.relu(conv(256, 1, "convc1", self.dtype)(corr))
            cor = nn.relu(conv(192, 3, "convc2", self.dtype)(cor))
            flo = nn.relu(conv(128, 7, "convf1", self.dtype)(flow))
            flo = nn.relu(conv(64, 3, "convf2", self.dtype)(flo))
            out = nn.relu(conv(126, 3, "conv", self.dtype)(jnp.concatenate([cor, flo], axis=-1)))
        return jnp.concatenate([out, flow.astype(out.dtype)], axis=-1)


class ConvGRU(nn.Module):
    """Convolutional GRU; the large model runs it twice, 1x5 then 5x1 (``SepConvGRU``), the small one 3x3."""

    hidden_dim: int
    separable: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, x: jax.Array) -> jax.Array:
        passes = (((1, 5), "1"), ((5, 1), "2")) if self.separable else (((3, 3), ""),)
        for kernel, suffix in passes:
            hx = jnp.concatenate([h, x], axis=-1)
            z = nn.sigmoid(conv(self.hidden_dim, kernel, f"convz{suffix}", self.dtype)(hx))
            r = nn.sigmoid(conv(self.hidden_dim, kernel, f"convr{suffix}", self.dtype)(hx))
            rhx = jnp.concatenate([r * h, x], axis=-1)
            q = jnp.tanh(conv(self.hidden_dim, kernel, f"convq{suffix}", self.dtype)(rhx))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return conv(2, 3, "conv2", self.dtype)(nn.relu(conv(self.hidden_dim, 3, "conv1", self.dtype)(h)))


class UpsampleMask(nn.Module):
    """The large model's convex-upsampling weights, scaled by 0.25 "to balance gradients" (princeton-vl)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        return 0.25 * conv(8 * 8 * 9, 1, "conv2", self.dtype)(nn.relu(conv(256, 3, "conv1", self.dtype)(h)))


class RefinementStep(nn.Module):
    """carry (hidden state, coords1) -> new carry and this iteration's full-resolution flow.

    Convolutions run in ``dtype``; the correlation lookup, coordinates and flows stay float32 (as
    princeton-vl's mixed precision: small flow increments added to large coordinates)."""

    small: bool
    radius: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, _, corr_state: CorrState, inp: jax.Array, coords0: jax.Array):
        net, coords1 = carry
        coords1 = jax.lax.stop_gradient(coords1)  # as the reference: no gradient through the lookup positions
        corr = lookup_corr(corr_state, coords1, radius=self.radius)
        flow = coords1 - coords0
        motion = MotionEncoder(self.small, self.dtype, name="encoder")(flow, corr)
        net = ConvGRU(96 if self.small else 128, separable=not self.small, dtype=self.dtype, name="gru")(
            net, jnp.concatenate([inp.astype(self.dtype), motion], axis=-1)
        )
        delta = FlowHead(128 if self.small else 256, self.dtype, name="flow_head")(net)
        coords1 = coords1 + delta.astype(jnp.float32)
        flow = coords1 - coords0
        if self.small:
            flow_up = upsample_bilinear(flow)
        else:
            flow_up = upsample_convex(flow, UpsampleMask(self.dtype, name="mask")(net).astype(jnp.float32))
        return (net, coords1), flow_up
