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

``impl="auto"`` decides before tracing, from the platform, the shape, the dtype
and the device's total memory only (never from timings or free memory), so every
run, resumed or parallel, makes the same choice; see ``choose_impl``.
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

# impl="auto" on CPUs: thresholds measured with experiments/bench_ga.py on a 2-core x86 CPU
# (see experiments/results/bench_ga_cpu.json).
PLAIN_MAX_WEIGHT_BYTES = 4 * 2**20
"""CPU: ``plain`` while its B*N*N float32 weights fit in this: below it, keeping alpha for the
backward pass beats recomputing it; above it ``chunked`` is faster both ways."""
CHUNK_ROWS = (256, 128)
"""CPU chunk: 256 query rows when a (B, 256, N) float32 block fits in ``CHUNK_BLOCK_BYTES``, else 128."""
CHUNK_BLOCK_BYTES = 8 * 2**20

# impl="auto" on accelerators (GPUs, and TPUs by the same rule, unmeasured there): plain is the
# fastest path (on one H200 at N=16,384, float32 forward+backward: plain 4.4 ms, chunked 12.1 ms),
# so it is taken whenever its temporaries fit in a fixed share of the device's memory.
ACCELERATOR_MEMORY_FRACTION = 1 / 16
"""Accelerators: share of the device's memory one GA call's forward+backward temporaries may take.
The memory is what the device reports to JAX (``memory_stats()["bytes_limit"]``: its total times
``XLA_PYTHON_CLIENT_MEM_FRACTION``, ~105 GiB on a 141 GiB H200 by default), fixed for the process. Small, because a model can hold several GA calls'
weights for its backward pass at once next to its own activations; fixed, because a rule on free
memory would change between runs and a resumed or parallel run must pick the same path."""
ATTENTION_BUFFERS = 4
"""(B, N, N) compute-dtype arrays alive at the peak of plain's forward+backward (logits, alpha
kept for the backward pass, d alpha, d logits; the CPU compile measures 3 to 4); a chunk keeps the
same number of (B, rows, N) blocks."""
ASSUMED_DEVICE_MEMORY_BYTES = 16 * 2**30
"""Accelerator memory assumed when the device does not report ``bytes_limit``."""

_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def _check_pair(child: jax.Array, parent: jax.Array) -> None:
    """Clear errors for inputs GA cannot take (shapes are static under jit)."""
    for name, x in (("child", child), ("parent", parent)):
        if x.ndim < 2:
            raise ValueError(f"genetic_attention: `{name}` must have rank >= 2 (B, ..., C), got shape {tuple(x.shape)}")
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


def _check_impl(impl, chunk_size) -> None:
    if impl not in IMPLS:
        raise ValueError(f"genetic_attention: `impl` must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"genetic_attention: `chunk_size` must be a positive int or None, got {chunk_size!r}")
    if chunk_size is not None and impl not in ("auto", "chunked"):
        raise ValueError(
            f"genetic_attention: `chunk_size`={chunk_size} only applies to impl='chunked', got impl={impl!r}"
        )


def cudnn_refusal(tokens: int, channels: int, dtype, *, platform: str, compute_capability=None) -> str | None:
    """Why cuDNN flash attention cannot run GA's alpha V on this input; None when it can.

    The shape rules of jax's cuDNN attention (``check_is_flash_attention`` in
    ``jax/_src/cudnn/fused_attention_stablehlo.py``), checked up front because
    some refusals come only while lowering, too late to fall back: bf16/f16 on
    a GPU; head dim (= C) a multiple of 8 and at most 128, or 256 from compute
    capability 9.0 (Hopper; unknown counts as older); an even token count, as
    the backward pass refuses odd lengths ("Unsupported sequence length Q 35, KV 35").
    """
    if platform != "gpu":
        return f"cuDNN runs on GPUs only (platform {platform!r})"
    if jnp.dtype(dtype) not in _HALF_DTYPES:
        return f"cuDNN flash attention takes bfloat16/float16 only, got {jnp.dtype(dtype)}"
    max_channels = 256 if compute_capability is not None and tuple(compute_capability) >= (9, 0) else 128
    if channels % 8 or channels > max_channels:
        return f"channels (head dim) must be a multiple of 8 and <= {max_channels}, got {channels}"
    if tokens % 2:
        return f"the number of tokens (sequence length) must be even, got {tokens}"
    return None


def _attention_bytes(batch: int, rows: int, tokens: int, dtype) -> int:
    """Peak forward+backward temporaries of ``rows`` query rows against ``tokens`` keys (ATTENTION_BUFFERS)."""
    return ATTENTION_BUFFERS * _compute_dtype(dtype).itemsize * batch * rows * tokens


def _chunk_rows(platform: str, batch: int, tokens: int, dtype, device_memory: int | None) -> int:
    """Query rows per chunk: the CPU rule, or on accelerators the largest power of two >= 128 in budget."""
    large, small = CHUNK_ROWS
    if platform == "cpu":
        rows = large if 4 * batch * large * tokens <= CHUNK_BLOCK_BYTES else small
    else:
        budget, rows = ACCELERATOR_MEMORY_FRACTION * device_memory, small
        while 2 * rows < tokens and _attention_bytes(batch, 2 * rows, tokens, dtype) <= budget:
            rows *= 2
    return min(rows, tokens)


def choose_impl(
    platform: str,
    batch: int,
    tokens: int,
    channels: int,
    dtype,
    *,
    device_memory: int | None = None,
    compute_capability=None,
) -> tuple[str, int | None]:
    """What ``impl="auto"`` runs, and its query rows per chunk: a pure function of its arguments.

    CPU (measured on CPU): ``plain`` while its B*N*N float32 weights fit in
    ``PLAIN_MAX_WEIGHT_BYTES``, else ``chunked`` (256 rows when a (B, 256, N)
    block fits in ``CHUNK_BLOCK_BYTES``, else 128).
    GPU and other accelerators: ``dot_product_attention`` (cuDNN) for bf16/f16
    inputs cuDNN takes (``cudnn_refusal``); otherwise ``plain``, the fastest, while
    its forward+backward temporaries fit in ``ACCELERATOR_MEMORY_FRACTION`` of
    ``device_memory`` (the device's total, ``ASSUMED_DEVICE_MEMORY_BYTES`` if
    unknown), else ``chunked`` with the largest power-of-two rows that fit.
    """
    if platform == "cpu":
        if 4 * batch * tokens * tokens <= PLAIN_MAX_WEIGHT_BYTES:
            return "plain", None
        return "chunked", _chunk_rows(platform, batch, tokens, dtype, None)
    if cudnn_refusal(tokens, channels, dtype, platform=platform, compute_capability=compute_capability) is None:
        return "dot_product_attention", None
    device_memory = device_memory or ASSUMED_DEVICE_MEMORY_BYTES
    if _attention_bytes(batch, tokens, tokens, dtype) <= ACCELERATOR_MEMORY_FRACTION * device_memory:
        return "plain", None
    return "chunked", _chunk_rows(platform, batch, tokens, dtype, device_memory)


@functools.cache
def device_facts(platform: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(total memory in bytes, compute capability) of the platform's first local device, where it says.

    Cached: read once per process, so every trace in a run sees the same numbers.
    (None, None) for CPUs and for platforms not present (e.g. ``backend="gpu"`` asked on a CPU host).
    """
    if platform == "cpu":
        return None, None
    try:
        device = jax.local_devices(backend=platform)[0]
    except RuntimeError:
        return None, None
    memory = (device.memory_stats() or {}).get("bytes_limit")
    capability = getattr(device, "compute_capability", None)
    capability = tuple(int(part) for part in str(capability).split(".")) if capability else None
    return memory, capability


def resolve_impl(
    impl: str,
    shape: tuple[int, ...],
    dtype,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
    device_memory: int | None = None,
    compute_capability=None,
) -> tuple[str, int | None]:
    """The softmax implementation (and query rows per chunk) ``impl`` means for this input.

    ``chunk_size`` given means ``chunked`` with that many rows; ``auto`` is
    ``choose_impl``; ``chunked`` alone takes ``choose_impl``'s rows rule.
    ``dot_product_attention`` on a GPU with bf16/f16 input means cuDNN, and an
    input cuDNN does not take is a ``ValueError`` saying why. ``backend``,
    ``device_memory`` and ``compute_capability`` default to the devices present.
    """
    _check_impl(impl, chunk_size)
    batch, tokens, channels = shape[0], math.prod(shape[1:-1]), shape[-1]
    if chunk_size is not None:
        return "chunked", min(chunk_size, tokens)
    platform = backend or jax.default_backend()
    if device_memory is None or compute_capability is None:
        present_memory, present_capability = device_facts(platform)
        device_memory = device_memory or present_memory
        compute_capability = compute_capability or present_capability
    if impl == "auto":
        return choose_impl(
            platform, batch, tokens, channels, dtype, device_memory=device_memory, compute_capability=compute_capability
        )
    if impl == "chunked":
        return impl, _chunk_rows(platform, batch, tokens, dtype, device_memory or ASSUMED_DEVICE_MEMORY_BYTES)
    if impl == "dot_product_attention" and platform == "gpu" and jnp.dtype(dtype) in _HALF_DTYPES:
        refusal = cudnn_refusal(tokens, channels, dtype, platform=platform, compute_capability=compute_capability)
        if refusal:
            raise ValueError(
                f"genetic_attention: impl='dot_product_attention' runs {jnp.dtype(dtype)} inputs on a GPU through "
                f"cuDNN flash attention, which does not take shape {tuple(shape)}: {refusal}. "
                "Use impl='auto' (picks plain or chunked here), 'plain' or 'chunked'."
            )
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
    the softmax and accumulators in float32); ``resolve_impl`` has already
    checked that cuDNN takes the shape. cuDNN is asked for by name because
    ``implementation=None`` still means XLA in jax 0.10. A setup without a
    usable cuDNN (refused at trace time), and every other backend, takes the
    XLA path in the float32+ compute dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if jax.default_backend() == "gpu" and q.dtype in _HALF_DTYPES:
        try:
            return jax.nn.dot_product_attention(
                q[:, :, None], kv[:, :, None], kv[:, :, None], scale=scale, implementation="cudnn"
            )[:, :, 0]
        except (NotImplementedError, RuntimeError):
            pass
    dt = _compute_dtype(q.dtype)
    q, kv = q.astype(dt)[:, :, None], kv.astype(dt)[:, :, None]
    return jax.nn.dot_product_attention(q, kv, kv, scale=scale, implementation=None)[:, :, 0]


def _check_tokens(shape: tuple[int, ...]) -> None:
    tokens = math.prod(shape[1:-1])
    if tokens < 2:
        raise ValueError(
            "genetic_attention: mode='softmax' needs at least 2 spatial tokens (with one token the "
            f"softmax is identically 1 and GA is identically 0); got shape {tuple(shape)} "
            f"({tokens} token). Use mode='gate' for pooled vectors."
        )


def _softmax_ga(child: jax.Array, parent: jax.Array, impl: str, rows: int | None) -> jax.Array:
    b, c = child.shape[0], child.shape[-1]
    n = math.prod(child.shape[1:-1])
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
      impl: softmax implementation; ``"auto"`` picks by ``choose_impl``.

    Returns:
      GA with the shape and dtype of ``child``. Softmax and gate are computed in
      at least float32.
    """
    _check_pair(child, parent)
    if resolve_mode(mode, child.ndim) == "gate":
        _check_impl(impl, chunk_size)
        return _gate_ga(child, parent)
    _check_tokens(child.shape)
    impl, rows = resolve_impl(impl, child.shape, child.dtype, chunk_size=chunk_size)
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
