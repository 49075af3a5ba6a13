"""RAFT's correlation pyramid and window lookup (Sec. 3.2), plus flow upsampling.

Two ways to the same correlation features:

* ``"all_pairs"``: the 4D volume <fmap1(p), fmap2(q)>/sqrt(C) for every pixel
  pair, average-pooled 2x2 over q three times; each iteration reads bilinear
  windows from it. (N^2 memory, N = H/8 * W/8.)
* ``"on_the_fly"``: the idea of princeton-vl's ``alt_cuda_corr``. Pooling the
  volume over q equals correlating with a pooled fmap2 (the dot product is
  linear), so only fmap2's pyramid is kept and each iteration computes the
  dot products inside the windows. (N * window memory.)

The lookup reproduces ``F.grid_sample(align_corners=True)`` with zero padding
at pixel coordinates: a window of radius r around a fractional centre reads
the (2r+2)^2 integer positions around floor(centre) (zero outside the map) and
mixes neighbours with the bilinear weights. Output channels are ordered like
princeton-vl's: level-major, then the x offset, then the y offset (its
``meshgrid(dy, dx)`` delta is added to (x, y), so the first window axis moves x).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CorrImpl = Literal["all_pairs", "on_the_fly"]
CORR_IMPLS = ("all_pairs", "on_the_fly")


class CorrState(NamedTuple):
    """What the iterations read correlations from: the pooled volumes, or fmap1 and fmap2's pyramid."""

    levels: tuple[jax.Array, ...]  # all_pairs: (B, N, h_l, w_l); on_the_fly: fmap2 pooled, (B, h_l, w_l, C)
    fmap1: jax.Array | None  # on_the_fly only: (B, N, C) scaled by 1/sqrt(C)


def coords_grid(batch: int, height: int, width: int) -> jax.Array:
    """Pixel coordinates (x, y) of every position, ``(B, H, W, 2)`` float32."""
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], axis=-1), (batch, height, width, 2))


def avg_pool2(x: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """``F.avg_pool2d(kernel=2, stride=2)`` over two axes (odd sizes drop the last row/column)."""
    a, b = axes
    h, w = x.shape[a] // 2, x.shape[b] // 2
    x = jax.lax.slice_in_dim(jax.lax.slice_in_dim(x, 0, 2 * h, axis=a), 0, 2 * w, axis=b)
    shape = list(x.shape)
    shape[b : b + 1] = [w, 2]
    shape[a : a + 1] = [h, 2]
    return x.reshape(shape).mean(axis=(a + 1, b + 2))


def build_corr(fmap1: jax.Array, fmap2: jax.Array, *, num_levels: int, impl: CorrImpl) -> CorrState:
    """fmaps ``(B, H, W, C)`` -> what :func:`lookup_corr` needs."""
    batch, height, width, channels = fmap1.shape
    scale = 1.0 / math.sqrt(channels)
    if impl == "all_pairs":
        volume = jnp.einsum("bnc,bmc->bnm", fmap1.reshape(batch, -1, channels), fmap2.reshape(batch, -1, channels))
        volume = (volume * scale).reshape(batch, height * width, height, width)
        levels = [volume]
        for _ in range(num_levels - 1):
            levels.append(avg_pool2(levels[-1], (2, 3)))
        return CorrState(tuple(levels), None)
    if impl == "on_the_fly":
        levels = [fmap2]
        for _ in range(num_levels - 1):
            levels.append(avg_pool2(levels[-1], (1, 2)))
        return CorrState(tuple(levels), fmap1.reshape(batch, -1, channels) * scale)
    raise ValueError(f"unknown corr_impl {impl!r}; expected one of {CORR_IMPLS}")


def _window(coords: jax.Array, radius: int, height: int, width: int):
    """Integer window around floor(coords): flat indices, validity and bilinear fractions.

    coords ``(B, N, 2)`` -> index ``(B, N, 2r+2 [x], 2r+2 [y])`` into a row-major (height, width) map,
    valid (same shape), fx and fy ``(B, N, 1, 1)``.
    """
    corner = jnp.floor(coords)
    frac = coords - corner
    offsets = jnp.arange(-radius, radius + 2, dtype=jnp.int32)
    xs = corner[..., 0].astype(jnp.int32)[..., None] + offsets  # (B, N, 2r+2)
    ys = corner[..., 1].astype(jnp.int32)[..., None] + offsets
    valid = ((xs >= 0) & (xs < width))[..., :, None] & ((ys >= 0) & (ys < height))[..., None, :]
    index = jnp.clip(ys, 0, height - 1)[..., None, :] * width + jnp.clip(xs, 0, width - 1)[..., :, None]
    return index, valid, frac[..., 0, None, None], frac[..., 1, None, None]


def _bilinear(values: jax.Array, fx: jax.Array, fy: jax.Array) -> jax.Array:
    """(2r+2)^2 integer-grid values -> (2r+1)^2 samples at the fractional offset (fx, fy)."""
    top = (1 - fx) * values[..., :-1, :] + fx * values[..., 1:, :]  # mixes along x (axis -2)
    return (1 - fy) * top[..., :-1] + fy * top[..., 1:]


def lookup_corr(state: CorrState, coords: jax.Array, *, radius: int) -> jax.Array:
    """Correlation features around ``coords`` ``(B, H, W, 2)`` -> ``(B, H, W, levels * (2r+1)^2)``."""
    batch, height, width, _ = coords.shape
    coords = coords.reshape(batch, height * width, 2)
    features = []
    for level, pyramid in enumerate(state.levels):
        centre = coords / 2**level
        if state.fmap1 is None:
            h_l, w_l = pyramid.shape[2:]
            index, valid, fx, fy = _window(centre, radius, h_l, w_l)
            flat = pyramid.reshape(batch, height * width, h_l * w_l)
            values = jnp.take_along_axis(flat, index.reshape(batch, height * width, -1), axis=-1)
            values = values.reshape(index.shape)
        else:
            h_l, w_l = pyramid.shape[1:3]
            index, valid, fx, fy = _window(centre, radius, h_l, w_l)
            values = _window_dots(state.fmap1, pyramid.reshape(batch, h_l * w_l, -1), index)
        samples = _bilinear(jnp.where(valid, values, 0.0), fx, fy)
        features.append(samples.reshape(batch, height * width, -1))
    return jnp.concatenate(features, axis=-1).reshape(batch, height, width, -1)


def _window_dots(fmap1: jax.Array, fmap2: jax.Array, index: jax.Array) -> jax.Array:
    """<fmap1(p), fmap2(index[p, a, b])> one window column ``a`` at a time (bounded memory).

    fmap1 ``(B, N, C)``, fmap2 ``(B, M, C)``, index ``(B, N, A, A)`` -> ``(B, N, A, A)``.
    Rematerialised in the backward pass, so training holds no gathered features either.
    """

    @jax.checkpoint
    def column(index_a):  # (B, N, A)
        gathered = jax.vmap(lambda f2, i: f2[i])(fmap2, index_a)  # (B, N, A, C)
        return jnp.einsum("bnc,bnac->bna", fmap1, gathered)

    columns = jax.lax.map(column, jnp.moveaxis(index, 2, 0))  # (A, B, N, A)
    return jnp.moveaxis(columns, 0, 2)


def upsample_convex(flow: jax.Array, mask: jax.Array) -> jax.Array:
    """RAFT's learned x8 upsampling: each fine pixel is a softmax-weighted mix of its 3x3 coarse neighbours.

    flow ``(B, H, W, 2)``, mask ``(B, H, W, 9*8*8)`` (PyTorch channel order: neighbour, row, column).
    """
    batch, height, width, _ = flow.shape
    weights = jax.nn.softmax(mask.reshape(batch, height, width, 9, 8, 8), axis=3)
    padded = jnp.pad(8 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours = jnp.stack(
        [padded[:, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=3
    )  # (B, H, W, 9, 2)
    fine = jnp.einsum("bhwkij,bhwkc->bhiwjc", weights, neighbours, precision=jax.lax.Precision.HIGHEST)
    return fine.reshape(batch, 8 * height, 8 * width, 2)


def _interp_matrix(size: int, factor: int) -> np.ndarray:
    """Rows mixing ``size`` samples into ``size * factor`` (``F.interpolate(bilinear, align_corners=True)``)."""
    out = size * factor
    matrix = np.zeros((out, size), np.float32)
    scale = np.float32((size - 1) / (out - 1)) if out > 1 else np.float32(0)
    source = np.arange(out, dtype=np.float32) * scale
    lower = np.minimum(np.floor(source).astype(np.int64), size - 1)
    upper = np.minimum(lower + 1, size - 1)
    frac = source - lower
    matrix[np.arange(out), lower] += 1 - frac
    matrix[np.arange(out), upper] += frac
    return matrix


def upsample_bilinear(flow: jax.Array, factor: int = 8) -> jax.Array:
    """RAFT-S's ``upflow8``: ``factor * interpolate(flow, x factor, bilinear, align_corners=True)``."""
    rows = jnp.asarray(_interp_matrix(flow.shape[1], factor))
    cols = jnp.asarray(_interp_matrix(flow.shape[2], factor))
    up = jnp.einsum("ih,bhwc,jw->bijc", rows, flow, cols, precision=jax.lax.Precision.HIGHEST)
    return factor * up
