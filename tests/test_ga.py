"""Genetic Attention against an independent float64 NumPy implementation of Eq. 2-3 and the gate form."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax import ga

SOFTMAX_IMPLS = ("plain", "chunked", "dot_product_attention", "auto")
SPATIAL_SHAPES = [(2, 37, 8), (2, 5, 7, 16)]
ALL_SHAPES = [(3, 16), *SPATIAL_SHAPES]


def _pair(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2))


def _softmax_weights(q, k):
    logits = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def _as_tokens(x):
    return np.asarray(x, np.float64).reshape(x.shape[0], -1, x.shape[-1])


def softmax_ga_ref(child, parent):
    """Eq. 2 in float64: GA = V - softmax(Q K^T / sqrt(C)) V with Q = child, K = V = parent."""
    q, k = _as_tokens(child), _as_tokens(parent)
    return (k - _softmax_weights(q, k) @ k).reshape(child.shape)


def softmax_ga_vjp_ref(child, parent, g):
    """Analytic (d child, d parent) of <g, GA> in float64."""
    q, k, g = _as_tokens(child), _as_tokens(parent), _as_tokens(g)
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = _softmax_weights(q, k)
    g_attended = -g  # GA = K - weights @ K
    g_weights = g_attended @ k.transpose(0, 2, 1)
    g_logits = weights * (g_weights - np.sum(g_weights * weights, axis=-1, keepdims=True)) * scale
    g_q = g_logits @ k
    g_k = g + g_logits.transpose(0, 2, 1) @ q + weights.transpose(0, 2, 1) @ g_attended
    return g_q.reshape(child.shape), g_k.reshape(child.shape)


def gate_ga_ref(child, parent):
    x, t = np.asarray(child, np.float64), np.asarray(parent, np.float64)
    a = 1.0 / (1.0 + np.exp(-np.sum(x * t, axis=-1, keepdims=True) / math.sqrt(x.shape[-1])))
    return (1.0 - a) * (t - x)


def gate_ga_vjp_ref(child, parent, g):
    x, t, g = (np.asarray(v, np.float64) for v in (child, parent, g))
    root_c = math.sqrt(x.shape[-1])
    a = 1.0 / (1.0 + np.exp(-np.sum(x * t, axis=-1, keepdims=True) / root_c))
    g_logit = -np.sum(g * (t - x), axis=-1, keepdims=True) * a * (1.0 - a)
    return -g * (1.0 - a) + g_logit * t / root_c, g * (1.0 - a) + g_logit * x / root_c


def rel_err(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def _cases():
    for shape in ALL_SHAPES:
        yield pytest.param(shape, "gate", "auto", id=f"gate-{shape}")
        if len(shape) > 2:
            for impl in SOFTMAX_IMPLS:
                yield pytest.param(shape, "softmax", impl, id=f"softmax-{impl}-{shape}")
        yield pytest.param(shape, "auto", "auto", id=f"auto-{shape}")


@pytest.mark.parametrize("shape, mode, impl", list(_cases()))
def test_value_and_gradient_match_float64_reference(shape, mode, impl):
    child, parent = _pair(shape, seed=len(shape))
    g = _pair(shape, seed=99)[0]
    softmax = ga.resolve_mode(mode, len(shape)) == "softmax"
    value_ref, vjp_ref = (softmax_ga_ref, softmax_ga_vjp_ref) if softmax else (gate_ga_ref, gate_ga_vjp_ref)

    out, vjp = jax.vjp(lambda x, t: ga.genetic_attention(x, t, mode=mode, impl=impl), child, parent)
    assert out.shape == shape and out.dtype == jnp.float32
    assert rel_err(out, value_ref(child, parent)) < 1e-5
    for got, want in zip(vjp(jnp.asarray(g)), vjp_ref(child, parent, g)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16, 36, 37, 64])
def test_chunked_equals_plain_for_any_chunk_size(chunk_size):
    child, parent = _pair((2, 37, 8), seed=3)

    def value_and_grads(**kwargs):
        f = lambda x, t: ga.genetic_attention(x, t, mode="softmax", **kwargs)
        return f(child, parent), jax.grad(lambda x, t: jnp.sum(jnp.sin(f(x, t))), argnums=(0, 1))(child, parent)

    plain, plain_grads = value_and_grads(impl="plain")
    chunked, chunked_grads = value_and_grads(chunk_size=chunk_size)
    np.testing.assert_allclose(chunked, plain, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(plain))))
    for got, want in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(want))))


def test_dot_product_attention_equals_plain():
    child, parent = _pair((2, 6, 9, 16), seed=4)
    plain = ga.genetic_attention(child, parent, impl="plain")
    fused = ga.genetic_attention(child, parent, impl="dot_product_attention")
    np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(plain))))


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
@pytest.mark.parametrize("mode, impl", [("gate", "auto"), *(("softmax", impl) for impl in SOFTMAX_IMPLS[:3])])
def test_half_precision_inputs_keep_dtype_and_float32_accuracy(dtype, tol, mode, impl):
    shape = (3, 16) if mode == "gate" else (2, 5, 7, 16)
    child, parent = (jnp.asarray(x, dtype) for x in _pair(shape, seed=5))
    out = ga.genetic_attention(child, parent, mode=mode, impl=impl)
    assert out.dtype == dtype
    exact = ga.genetic_attention(child.astype(jnp.float32), parent.astype(jnp.float32), mode=mode, impl="plain")
    assert rel_err(out.astype(jnp.float32), np.asarray(exact, np.float64)) < tol
    grads = jax.grad(lambda x: jnp.sum(ga.genetic_attention(x, parent, mode=mode, impl=impl).astype(jnp.float32)))(
        child
    )
    assert grads.dtype == dtype and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 7, 16)])
def test_etm_mix_adds_lambda_times_ga(shape):
    child, parent = _pair(shape, seed=6)
    mixed = ga.etm_mix(child, parent, lam=0.6)
    np.testing.assert_allclose(mixed, child + 0.6 * ga.genetic_attention(child, parent), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ga.etm_mix(child, parent, lam=0.0), child)
    _, diagnostic = ga.etm_mix_with_diagnostic(child, parent, lam=0.6, impl="chunked" if len(shape) > 2 else "auto")
    assert np.isfinite(float(diagnostic))


_VEC = np.ones((2, 8), np.float32)
_MAP = np.ones((2, 4, 8), np.float32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ga.genetic_attention(np.ones(5, np.float32), np.ones(5, np.float32)), r"`child`.*rank.*\(5,\)"),
        (lambda: ga.genetic_attention(_MAP, np.ones((2, 5, 8), np.float32)), r"child \(2, 4, 8\).*parent \(2, 5, 8\)"),
        (lambda: ga.genetic_attention(_VEC, _VEC, mode="softmax"), r"2 spatial tokens.*\(2, 8\)"),
        (lambda: ga.genetic_attention(_MAP[:, :1], _MAP[:, :1], mode="softmax"), r"2 spatial tokens.*\(2, 1, 8\)"),
        (lambda: ga.genetic_attention(_MAP.astype(np.int32), _MAP), r"`child`.*floating.*int32.*\(2, 4, 8\)"),
        (lambda: ga.genetic_attention(_MAP, _MAP, mode="dot"), r"`mode`.*'dot'"),
        (lambda: ga.genetic_attention(_MAP, _MAP, impl="flash"), r"`impl`.*'flash'"),
        (lambda: ga.genetic_attention(_MAP, _MAP, chunk_size=0), r"`chunk_size`.*0"),
        (lambda: ga.genetic_attention(_MAP, _MAP, chunk_size=2.5), r"`chunk_size`.*2.5"),
        (lambda: ga.genetic_attention(_MAP, _MAP, chunk_size=True), r"`chunk_size`.*True"),
        (lambda: ga.genetic_attention(_MAP, _MAP, chunk_size=2, impl="plain"), r"`chunk_size`.*impl='plain'"),
        (lambda: ga.etm_mix(_MAP, _MAP, lam=-0.1), r"`lam`.*-0.1"),
        (lambda: ga.etm_mix(_MAP, _MAP, lam=1.5), r"`lam`.*1.5"),
        (lambda: ga.etm_mix(_MAP, _MAP, lam=float("nan")), r"`lam`.*nan"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_needs_far_less_temporary_memory_than_plain():
    """Forward and backward of the chunked path stay well below the N*N*4 bytes of alpha.

    The plain forward on CPU runs as one library fusion whose internal buffers
    ``memory_analysis`` does not count, so the sanity check that the metric sees
    alpha uses plain's gradient, which must keep alpha as a residual.
    """
    n = 4096
    child, parent = (jax.ShapeDtypeStruct((1, n, 32), jnp.float32),) * 2
    weights_bytes = n * n * 4

    def loss(impl):
        return lambda x, t: jnp.sum(ga.genetic_attention(x, t, mode="softmax", impl=impl))

    plain_grad = jax.grad(loss("plain"), argnums=(0, 1))
    chunked_grad = jax.grad(loss("chunked"), argnums=(0, 1))
    assert _temp_bytes(plain_grad, child, parent) >= weights_bytes
    assert _temp_bytes(lambda x, t: ga.genetic_attention(x, t, impl="chunked"), child, parent) < weights_bytes / 4
    assert _temp_bytes(chunked_grad, child, parent) < weights_bytes / 4


def test_auto_impl_rule():
    assert ga.resolve_impl("auto", (8, 16, 16, 64), jnp.float32, backend="cpu") == ("plain", None)
    assert ga.resolve_impl("auto", (1, 64, 64, 128), jnp.float32, backend="cpu") == ("chunked", 256)
    assert ga.resolve_impl("auto", (1, 128, 128, 128), jnp.float32, backend="cpu") == ("chunked", 128)
    assert ga.resolve_impl("auto", (1, 128, 128, 128), jnp.bfloat16, backend="gpu") == ("dot_product_attention", None)
    assert ga.resolve_impl("auto", (2, 37, 8), jnp.float32, chunk_size=100) == ("chunked", 37)
