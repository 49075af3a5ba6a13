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

The softmax form has three numerically equal implementations (``impl=``):
``"plain"`` materialises alpha (B x N x N); ``"chunked"`` walks blocks of query
rows with a hand-written backward pass, so neither direction keeps more than a
(B, rows, N) block alive (reverse-mode only: ``jax.jvp`` needs ``plain``);
``"dot_product_attention"`` hands alpha V to ``jax.nn.dot_product_attention``
(cuDNN flash attention on NVIDIA GPUs for bf16/f16 inputs; XLA elsewhere,
which materialises the logits and alpha, 2 x B*N*N floats).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

Mode = Literal["auto", "softmax", "gate"]
MODES = ("auto", "softmax", "gate")
Impl = Literal["auto", "plain", "chunked", "dot_product_attention"]
IMPLS = ("auto", "plain", "chunked", "dot_product_attention")

# impl="auto" thresholds, measured with experiments/bench_ga.py on a 2-core x86 CPU
# (see experiments/results/bench_ga_cpu.json); not tuned for GPUs.
PLAIN_MAX_WEIGHT_BYTES = 4 * 2**20
"""``plain`` while its B*N*N float32 weights fit in this: below it, keeping alpha for the
backward pass beats recomputing it; above it ``chunked`` is faster both ways."""
CHUNK_ROWS = (256, 128)
"""Auto chunk: 256 query rows when a (B, 256, N) float32 block fits in ``CHUNK_BLOCK_BYTES``, else 128."""
CHUNK_BLOCK_BYTES = 8 * 2**20

_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


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


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"genetic_attention: `chunk_size` must be a positive int or None, got {chunk_size!r}")


def _auto_chunk_rows(batch: int, tokens: int) -> int:
    large, small = CHUNK_ROWS
    rows = large if 4 * batch * large * tokens <= CHUNK_BLOCK_BYTES else small
    return min(rows, tokens)


def resolve_impl(
    impl: str,
    shape: tuple[int, ...],
    dtype,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[str, int | None]:
    """The softmax implementation (and query rows per chunk) ``impl`` means for this input.

    ``chunk_size`` given means ``chunked`` with that many rows. ``auto``:
      * GPU, bf16/f16 input -> ``dot_product_attention`` (cuDNN flash attention);
      * B*N*N*4 bytes of weights <= ``PLAIN_MAX_WEIGHT_BYTES`` (4 MiB) -> ``plain``;
      * otherwise ``chunked``: 256 query rows per block when a (B, 256, N) float32
        block fits in ``CHUNK_BLOCK_BYTES`` (8 MiB), else 128.
    ``impl="chunked"`` without ``chunk_size`` uses the same rows. The thresholds
    were measured on CPU; on GPU they are a memory rule, not a speed one.
    """
    if impl not in IMPLS:
        raise ValueError(f"genetic_attention: `impl` must be one of {IMPLS}, got {impl!r}")
    _check_chunk_size(chunk_size)
    batch, tokens = shape[0], math.prod(shape[1:-1])
    if chunk_size is not None:
        if impl not in ("auto", "chunked"):
            raise ValueError(
                f"genetic_attention: `chunk_size`={chunk_size} only applies to impl='chunked', got impl={impl!r}"
            )
        return "chunked", min(chunk_size, tokens)
    if impl == "auto":
        backend = backend or jax.default_backend()
        if backend == "gpu" and jnp.dtype(dtype) in _HALF_DTYPES:
            impl = "dot_product_attention"
        elif 4 * batch * tokens * tokens <= PLAIN_MAX_WEIGHT_BYTES:
            impl = "plain"
        else:
            impl = "chunked"
    if impl == "chunked":
        return impl, _auto_chunk_rows(batch, tokens)
    return impl, None


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
    logits = jnp.einsum("bqc,bkc->bqk", q, kv) * scale
    return jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), kv)


def _attend_rows(q_rows: jax.Array, kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha V and the log-sum-exp of the logits for a block of query rows."""
    logits = jnp.einsum("bqc,bkc->bqk", q_rows / math.sqrt(q_rows.shape[-1]), kv)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    return jnp.einsum("bqk,bkc->bqc", unnormalised, kv) / total, peak + jnp.log(total)


def _attend_rows_grad(q_rows, kv, out_rows, lse_rows, g_rows) -> tuple[jax.Array, jax.Array]:
    """(d q_rows, d kv) of ``<g_rows, alpha V>``, recomputing alpha from the saved log-sum-exp."""
    scale = 1.0 / math.sqrt(q_rows.shape[-1])
    scaled_q = q_rows * scale
    weights = jnp.exp(jnp.einsum("bqc,bkc->bqk", scaled_q, kv) - lse_rows)
    g_weights = jnp.einsum("bqc,bkc->bqk", g_rows, kv)
    g_logits = weights * (g_weights - jnp.sum(g_rows * out_rows, axis=-1, keepdims=True))
    g_q = jnp.einsum("bqk,bkc->bqc", g_logits, kv) * scale
    g_kv = jnp.einsum("bqk,bqc->bkc", g_logits, scaled_q) + jnp.einsum("bqk,bqc->bkc", weights, g_rows)
    return g_q, g_kv


def _row_blocks(x: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """(B, N, ...) -> full blocks (N // rows, B, rows, ...) and the (B, N % rows, ...) rest."""
    b, n = x.shape[:2]
    full = n // rows * rows
    blocks = x[:, :full].reshape(b, n // rows, rows, *x.shape[2:]).swapaxes(0, 1)
    return blocks, x[:, full:]


def _join_row_blocks(blocks: jax.Array, rest: jax.Array) -> jax.Array:
    num_blocks, b, rows = blocks.shape[:3]
    joined = blocks.swapaxes(0, 1).reshape(b, num_blocks * rows, *blocks.shape[3:])
    return jnp.concatenate([joined, rest], axis=1) if rest.shape[1] else joined


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attend_chunked(q: jax.Array, kv: jax.Array, rows: int) -> jax.Array:
    """alpha V in blocks of ``rows`` queries: one (B, rows, N) weight block alive at a time.

    Blocks run under ``lax.map``/``scan`` (compiled once, whatever N); the
    N % rows leftover queries are one smaller block. The backward pass keeps
    only the output and the per-row log-sum-exp and rebuilds each block's
    weights, the flash-attention recipe, so it is as lean as the forward.
    """
    return _attend_chunked_fwd(q, kv, rows)[0]


def _attend_chunked_fwd(q, kv, rows):
    blocks, rest = _row_blocks(q, rows)
    out_blocks, lse_blocks = jax.lax.map(lambda q_rows: _attend_rows(q_rows, kv), blocks)
    out_rest, lse_rest = _attend_rows(rest, kv)
    out, lse = _join_row_blocks(out_blocks, out_rest), _join_row_blocks(lse_blocks, lse_rest)
    return out, (q, kv, out, lse)


def _attend_chunked_bwd(rows, residuals, g_out):
    q, kv, out, lse = residuals
    blocked = [_row_blocks(x, rows) for x in (q, out, lse, g_out)]
    # The leftover block (empty when rows divides N) seeds the d kv sum.
    g_q_rest, g_kv = _attend_rows_grad(blocked[0][1], kv, *(rest for _, rest in blocked[1:]))

    def accumulate(g_kv_sum, block):
        g_q_rows, g_kv_rows = _attend_rows_grad(block[0], kv, *block[1:])
        return g_kv_sum + g_kv_rows, g_q_rows

    g_kv, g_q_blocks = jax.lax.scan(accumulate, g_kv, tuple(full for full, _ in blocked))
    return _join_row_blocks(g_q_blocks, g_q_rest), g_kv


_attend_chunked.defvjp(_attend_chunked_fwd, _attend_chunked_bwd)


def _attend_dot_product(q: jax.Array, kv: jax.Array) -> jax.Array:
    """alpha V through ``jax.nn.dot_product_attention`` as one head (attention with K = V).

    On a GPU, bf16/f16 inputs go to cuDNN flash attention as they are (it keeps
    the softmax and accumulators in float32). cuDNN is asked for by name because
    ``implementation=None`` still means XLA in jax 0.10. Whatever cuDNN refuses
    at trace time (head dim, GPU generation, cuDNN version), and every other backend,
    takes the XLA path in the float32+ compute dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if jax.default_backend() == "gpu" and q.dtype in _HALF_DTYPES:
        try:
            return jax.nn.dot_product_attention(
                q[:, :, None], kv[:, :, None], kv[:, :, None], scale=scale, implementation="cudnn"
            )[:, :, 0]
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    dt = _compute_dtype(q.dtype)
    q, kv = q.astype(dt)[:, :, None], kv.astype(dt)[:, :, None]
    return jax.nn.dot_product_attention(q, kv, kv, scale=scale, implementation=None)[:, :, 0]


def _softmax_ga(child: jax.Array, parent: jax.Array, impl: str, rows: int | None) -> jax.Array:
    b, c = child.shape[0], child.shape[-1]
    n = math.prod(child.shape[1:-1])
    if n < 2:
        raise ValueError(
            "genetic_attention: mode='softmax' needs at least 2 spatial tokens (with one token the "
            f"softmax is identically 1 and GA is identically 0); got shape {tuple(child.shape)} "
            f"({n} token). Use mode='gate' for pooled vectors."
        )
    dt = _compute_dtype(child.dtype)
    q, kv = child.reshape(b, n, c), parent.reshape(b, n, c)
    if impl == "dot_product_attention":
        attended = _attend_dot_product(q, kv)
    elif impl == "chunked":
        attended = _attend_chunked(q.astype(dt), kv.astype(dt), rows)
    else:
        attended = _attend_plain(q.astype(dt), kv.astype(dt))
    return (kv.astype(dt) - attended.astype(dt)).reshape(child.shape).astype(child.dtype)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size", "impl"))
def genetic_attention(
    child: jax.Array,
    parent: jax.Array,
    *,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """GA(tau, x'): the part of the parent's features ``parent`` the child ``child`` lacks.

    Args:
      child: the child's activation x' (the query), ``(B, *spatial, C)``.
      parent: the parent's features after Transfer, tau(x) (keys = values), same shape.
      mode: ``"softmax"`` (Eq. 2), ``"gate"`` (released code) or ``"auto"``.
      chunk_size: softmax only; process queries in blocks of this many tokens so
        no N x N buffer exists (implies ``impl="chunked"``).
      impl: softmax implementation, see ``resolve_impl`` for what ``"auto"`` picks.

    Returns:
      GA with the shape and dtype of ``child``. Softmax and gate are computed in
      at least float32.
    """
    _check_pair(child, parent)
    resolved = resolve_mode(mode, child.ndim)
    impl, rows = resolve_impl(impl, child.shape, child.dtype, chunk_size=chunk_size)
    if resolved == "gate":
        return _gate_ga(child, parent)
    return _softmax_ga(child, parent, impl, rows)


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
    impl: Impl = "auto",
) -> jax.Array:
    """The Mixture of Eq. 3: x' + lam * GA(tau(x), x'), in the child's dtype."""
    return etm_mix_with_diagnostic(child, parent, lam=lam, mode=mode, chunk_size=chunk_size, impl=impl)[0]


def etm_mix_with_diagnostic(
    child: jax.Array,
    parent: jax.Array,
    *,
    lam: float,
    mode: Mode = "auto",
    chunk_size: int | None = None,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """``etm_mix`` plus one number worth logging about it.

    Gate mode: the mean gate value a (near 1: the child already has what the
    parent offers). Softmax mode: ||GA|| / ||x'||, how large the inherited
    signal is relative to the child's own activation.
    """
    check_lam(lam)
    return _etm_mix(child, parent, lam, mode=mode, chunk_size=chunk_size, impl=impl)


@functools.partial(jax.jit, static_argnames=("mode", "chunk_size", "impl"))
def _etm_mix(child, parent, lam, *, mode, chunk_size, impl):
    ga = genetic_attention(child, parent, mode=mode, chunk_size=chunk_size, impl=impl)
    mixed = child + jnp.asarray(lam, child.dtype) * ga
    if resolve_mode(mode, child.ndim) == "gate":
        diagnostic = jnp.mean(gate_values(child, parent))
    else:
        dt = _compute_dtype(child.dtype)
        diagnostic = jnp.linalg.norm(ga.astype(dt).ravel()) / (jnp.linalg.norm(child.astype(dt).ravel()) + 1e-12)
    return mixed, diagnostic
