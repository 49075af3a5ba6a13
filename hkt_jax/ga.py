"""Genetic Attention (GA) and the ETM mixing rule (paper Eq. 2-3).

GA is a *dissimilarity* operator: the child's activation x' is the query, the
parent's transferred features tau(x) are both keys and values, and the result
is what the parent has that the child's view does not already explain:

    softmax form (Eq. 2):  alpha = softmax(Q K^T / sqrt(C)),  GA = V - alpha V
    gate form (released code, pooled vectors):
                           a = sigmoid(<x', tau> / sqrt(C)),  GA = (1 - a)(tau - x')

Features are channels-last, ``(B, *spatial, C)``; in the softmax form the tokens
are the flattened spatial positions. Everything here is a pure function, safe
under ``jax.jit`` / ``grad`` / ``vmap``.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["auto", "softmax", "gate"]
MODES = ("auto", "softmax", "gate")


def _check_pair(child: jax.Array, parent: jax.Array) -> None:
    """Clear errors for inputs GA cannot take (shapes are static under jit)."""
    for name, x in (("child", child), ("parent", parent)):
        if x.ndim < 2:
            raise ValueError(
                f"genetic_attention: `{name}` must have rank >= 2 (B, ..., C), got shape {tuple(x.shape)}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"genetic_attention: `{name}` must be a floating dtype, got {x.dtype} (shape {tuple(x.shape)})"
            )
    if child.shape != parent.shape:
        raise ValueError(
            "genetic_attention: `child` and `parent` must have the same shape (use a Transfer unit "
            f"to align them first), got child {tuple(child.shape)} and parent {tuple(parent.shape)}"
        )


def resolve_mode(mode: str, ndim: int) -> str:
    """``auto`` means softmax over spatial tokens when there are any, gate for vectors."""
    if mode not in MODES:
        raise ValueError(f"genetic_attention: `mode` must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "softmax" if ndim > 2 else "gate"
    return mode


def _compute_dtype(dtype) -> jnp.dtype:
    """Low-precision inputs are computed in float32; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def gate_values(child: jax.Array, parent: jax.Array) -> jax.Array:
    """The gate a = sigmoid(<x', tau>/sqrt(C)), shape ``child.shape[:-1] + (1,)``, float32+."""
    dt = _compute_dtype(child.dtype)
    c, p = child.astype(dt), parent.astype(dt)
    return jax.nn.sigmoid(jnp.sum(c * p, axis=-1, keepdims=True) / math.sqrt(child.shape[-1]))


def _gate_ga(child: jax.Array, parent: jax.Array) -> jax.Array:
    dt = _compute_dtype(child.dtype)
    a = gate_values(child, parent)
    return ((1.0 - a) * (parent.astype(dt) - child.astype(dt))).astype(child.dtype)


def _attend_plain(q: jax.Array, kv: jax.Array) -> jax.Array:
    """alpha V for q (B, Nq, C) against kv (B, N, C); materialises the (B, Nq, N) weights."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqc,bkc->bqk", q, kv, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bqk,bkc->bqc", weights.astype(kv.dtype), kv, preferred_element_type=jnp.float32)


def _attend_chunked(q: jax.Array, kv: jax.Array, chunk_size: int) -> jax.Array:
    """alpha V in query blocks of ``chunk_size``: never more than (B, chunk, N) weights alive.

    The block body is rematerialised in the backward pass, so gradients are as
    lean as the forward. Queries are zero-padded up to a multiple of the chunk;
    padded rows are computed and dropped (they never touch the real rows).
    """
    b, n, c = q.shape
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    q_padded = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    q_blocks = q_padded.reshape(b, num_chunks, chunk_size, c).swapaxes(0, 1)

    @jax.checkpoint
    def block(q_block):
        return _attend_plain(q_block, kv)

    out = jax.lax.map(block, q_blocks)  # (num_chunks, B, chunk, C)
    return out.swapaxes(0, 1).reshape(b, num_chunks * chunk_size, c)[:, :n]


def _softmax_ga(child: jax.Array, parent: jax.Array, chunk_size: int | None) -> jax.Array:
    b, c = child.shape[0], child.shape[-1]
    n = math.prod(child.shape[1:-1])
    if n < 2:
        raise ValueError(
            "genetic_attention: mode='softmax' needs at least 2 spatial tokens (with one token the "
            f"softmax is identically 1 and GA is identically 0); got shape {tuple(child.shape)} "
            f"({n} token). Use mode='gate' for pooled vectors."
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"genetic_attention: `chunk_size` must be a positive int or None, got {chunk_size!r}")
    dt = _compute_dtype(child.dtype)
    q = child.reshape(b, n, c).astype(dt)
    kv = parent.reshape(b, n, c).astype(dt)
    if chunk_size is None or chunk_size >= n:
        attended = _attend_plain(q, kv)
    else:
        attended = _attend_chunked(q, kv, chunk_size)
    return (kv - attended.astype(dt)).reshape(child.shape).astype(child.dtype)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
def genetic_attention(
    child: jax.Array,
    parent: jax.Array,
    *,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """GA(tau, x'): the part of the parent's features ``parent`` the child ``child`` lacks.

    Args:
      child: the child's activation x' (the query), ``(B, *spatial, C)``.
      parent: the parent's features after Transfer, tau(x) (keys = values), same shape.
      mode: ``"softmax"`` (Eq. 2), ``"gate"`` (released code) or ``"auto"``.
      chunk_size: softmax only; process queries in blocks of this many tokens so
        no N x N buffer exists. ``None`` materialises the weights.

    Returns:
      GA with the shape and dtype of ``child``. Softmax and gate are computed in
      at least float32.
    """
    _check_pair(child, parent)
    resolved = resolve_mode(mode, child.ndim)
    if resolved == "gate":
        return _gate_ga(child, parent)
    return _softmax_ga(child, parent, chunk_size)


def check_lam(lam) -> None:
    """lambda must lie in [0, 1] (checked when it is a concrete number)."""
    try:
        value = float(lam)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # a traced lambda (e.g. a schedule inside jit) cannot be checked here
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"etm_mix: `lam` must lie in [0, 1], got {lam!r}")


def etm_mix(
    child: jax.Array,
    parent: jax.Array,
    *,
    lam: float,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """The Mixture of Eq. 3: x' + lam * GA(tau(x), x'), in the child's dtype."""
    return etm_mix_with_diagnostic(child, parent, lam=lam, mode=mode, chunk_size=chunk_size)[0]


def etm_mix_with_diagnostic(
    child: jax.Array,
    parent: jax.Array,
    *,
    lam: float,
    mode: Mode = "auto",
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``etm_mix`` plus one number worth logging about it.

    Gate mode: the mean gate value a (near 1: the child already has what the
    parent offers). Softmax mode: ||GA|| / ||x'||, how large the inherited
    signal is relative to the child's own activation.
    """
    check_lam(lam)
    return _etm_mix(child, parent, lam, mode=mode, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size"))
def _etm_mix(child, parent, lam, *, mode, chunk_size):
    ga = genetic_attention(child, parent, mode=mode, chunk_size=chunk_size)
    mixed = child + jnp.asarray(lam, child.dtype) * ga
    if resolve_mode(mode, child.ndim) == "gate":
        diagnostic = jnp.mean(gate_values(child, parent))
    else:
        dt = _compute_dtype(child.dtype)
        diagnostic = jnp.linalg.norm(ga.astype(dt).ravel()) / (jnp.linalg.norm(child.astype(dt).ravel()) + 1e-12)
    return mixed, diagnostic
