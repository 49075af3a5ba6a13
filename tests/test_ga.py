"""Genetic Attention against an independent float64 NumPy implementation of Eq. 2-3 and the gate form."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.engine import ga

SOFTMAX_IMPLS = ("plain", "chunked", "dot_product_attention", "auto")
SPATIAL_SHAPES = [(2, 37, 8), (2, 5, 7, 16)]
ALL_SHAPES = [(3, 16), *SPATIAL_SHAPES]
FLOAT32_AGREEMENT = 1e-5
"""Two float32 paths of GA agree to this share of the largest value: they sum N terms in different
orders (blocks, GPU reduction trees), a few ulp each; a real mistake is O(1)."""
GIB = 2**30
ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture
def full_float32_matmuls():
    """float32 matmuls at float32 precision: GPUs default to TF32 (~1e-3), too coarse for float64 references."""
    with jax.default_matmul_precision("highest"):
        yield


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


@pytest.mark.gpu
@pytest.mark.usefixtures("full_float32_matmuls")
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


@pytest.mark.gpu
@pytest.mark.usefixtures("full_float32_matmuls")
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 16, 36, 37, 64])
def test_chunked_equals_plain_for_any_chunk_size(chunk_size):
    child, parent = _pair((2, 37, 8), seed=3)

    def value_and_grads(**kwargs):
        f = lambda x, t: ga.genetic_attention(x, t, mode="softmax", **kwargs)
        return f(child, parent), jax.grad(lambda x, t: jnp.sum(jnp.sin(f(x, t))), argnums=(0, 1))(child, parent)

    plain, plain_grads = value_and_grads(impl="plain")
    chunked, chunked_grads = value_and_grads(chunk_size=chunk_size)
    np.testing.assert_allclose(chunked, plain, rtol=0, atol=FLOAT32_AGREEMENT * float(jnp.max(jnp.abs(plain))))
    for got, want in zip(chunked_grads, plain_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT32_AGREEMENT * float(jnp.max(jnp.abs(want))))


@pytest.mark.gpu
@pytest.mark.usefixtures("full_float32_matmuls")
def test_dot_product_attention_equals_plain():
    child, parent = _pair((2, 6, 9, 16), seed=4)
    plain = ga.genetic_attention(child, parent, impl="plain")
    fused = ga.genetic_attention(child, parent, impl="dot_product_attention")
    np.testing.assert_allclose(fused, plain, rtol=0, atol=FLOAT32_AGREEMENT * float(jnp.max(jnp.abs(plain))))


def _half_cases():
    """N = 35 tokens (odd: cuDNN refuses it, tested below) and N = 24 for cuDNN; ``auto`` takes both."""
    yield pytest.param("gate", "auto", (3, 16), id="gate")
    for impl, shapes in (("plain", "odd"), ("chunked", "odd"), ("dot_product_attention", "even"), ("auto", "odd,even")):
        for parity in shapes.split(","):
            shape = (2, 5, 7, 16) if parity == "odd" else (2, 4, 6, 16)
            yield pytest.param("softmax", impl, shape, id=f"softmax-{impl}-{parity}")


@pytest.mark.gpu
@pytest.mark.usefixtures("full_float32_matmuls")
@pytest.mark.parametrize("dtype, eps", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
@pytest.mark.parametrize("mode, impl, shape", list(_half_cases()))
def test_half_precision_inputs_keep_dtype_and_float32_accuracy(dtype, eps, mode, impl, shape):
    """Within one ulp of the output dtype, two for cuDNN (it rounds alpha to that dtype before alpha V)."""
    child, parent = (jnp.asarray(x, dtype) for x in _pair(shape, seed=5))
    out = ga.genetic_attention(child, parent, mode=mode, impl=impl)
    assert out.dtype == dtype
    exact = ga.genetic_attention(child.astype(jnp.float32), parent.astype(jnp.float32), mode=mode, impl="plain")
    tol = 2 * eps if impl in ("dot_product_attention", "auto") else eps
    assert rel_err(out.astype(jnp.float32), np.asarray(exact, np.float64)) < tol
    grads = jax.grad(lambda x: jnp.sum(ga.genetic_attention(x, parent, mode=mode, impl=impl).astype(jnp.float32)))(
        child
    )
    assert grads.dtype == dtype and bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


@pytest.mark.gpu
@pytest.mark.usefixtures("full_float32_matmuls")
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


def _cpu_temp_bytes(fn, *shapes):
    """Compiled temporary bytes of ``fn`` for XLA:CPU, whatever the default backend."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=cpu) for shape in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _loss(**impl):
    return lambda x, t: jnp.sum(ga.genetic_attention(x, t, mode="softmax", **impl))


def test_chunked_needs_far_less_temporary_memory_than_plain():
    """On XLA:CPU, forward and backward of the chunked path stay well below the N*N*4 bytes of alpha.

    The plain forward on CPU runs as one library fusion whose internal buffers
    ``memory_analysis`` does not count, so the sanity check that the metric sees
    alpha uses plain's gradient, which must keep alpha as a residual. The chunk
    is given (256 rows, the CPU rule's) because a GPU host's rule picks larger ones.
    """
    shape = (1, 4096, 32)
    weights_bytes = shape[1] ** 2 * 4
    assert _cpu_temp_bytes(jax.grad(_loss(impl="plain"), argnums=(0, 1)), shape, shape) >= weights_bytes
    assert _cpu_temp_bytes(lambda x, t: ga.genetic_attention(x, t, chunk_size=256), shape, shape) < weights_bytes / 4
    assert _cpu_temp_bytes(jax.grad(_loss(chunk_size=256), argnums=(0, 1)), shape, shape) < weights_bytes / 4


@pytest.mark.parametrize("shape", [(1, 1024, 32), (2, 512, 64)])
def test_auto_memory_model_bounds_plain_forward_backward(shape):
    """``ATTENTION_BUFFERS`` B*N*N float32 arrays cover what XLA:CPU compiles for plain's forward+backward.

    (Besides them XLA keeps a few (B, N, C) arrays, under 1% of the total here.)
    """
    batch, tokens, channels = shape
    estimate = ga.ATTENTION_BUFFERS * 4 * batch * tokens**2
    measured = _cpu_temp_bytes(jax.grad(_loss(impl="plain"), argnums=(0, 1)), shape, shape)
    assert 2 * batch * tokens**2 * 4 <= measured <= estimate + 8 * 4 * batch * tokens * channels


def test_auto_impl_rule_on_cpu():
    assert ga.resolve_impl("auto", (8, 16, 16, 64), jnp.float32, backend="cpu") == ("plain", None)
    assert ga.resolve_impl("auto", (1, 64, 64, 128), jnp.float32, backend="cpu") == ("chunked", 256)
    assert ga.resolve_impl("auto", (1, 128, 128, 128), jnp.float32, backend="cpu") == ("chunked", 128)
    # CPUs have no cuDNN: half-precision inputs follow the same rule.
    assert ga.resolve_impl("auto", (1, 128, 128, 128), jnp.bfloat16, backend="cpu") == ("chunked", 128)
    assert ga.resolve_impl("auto", (2, 37, 8), jnp.float32, chunk_size=100) == ("chunked", 37)


H200, SMALL_GPU, HOPPER, AMPERE = 141 * GIB, 16 * GIB, (9, 0), (8, 0)


@pytest.mark.parametrize(
    "shape, dtype, memory, capability, expected",
    [
        # float32: plain, the fastest, while 4 x B*N*N*4 bytes fit in 1/16 of the card
        ((1, 128, 128, 128), jnp.float32, H200, HOPPER, ("plain", None)),  # 4 GiB of 8.8 GiB
        ((2, 128, 128, 128), jnp.float32, H200, HOPPER, ("plain", None)),  # 8 GiB
        ((3, 128, 128, 128), jnp.float32, H200, HOPPER, ("chunked", 8192)),  # 12 GiB: chunks of 6 GiB
        ((1, 128, 128, 128), jnp.float32, SMALL_GPU, HOPPER, ("chunked", 4096)),  # budget 1 GiB
        ((1, 128, 128, 128), jnp.float32, 2 * GIB, HOPPER, ("chunked", 512)),  # budget 128 MiB
        ((1, 128, 128, 128), jnp.float32, GIB // 4, HOPPER, ("chunked", 128)),  # nothing fits: smallest chunk
        ((8, 46, 62, 256), jnp.float32, SMALL_GPU, HOPPER, ("plain", None)),  # RAFT features: 0.97 of 1 GiB
        ((16, 46, 62, 256), jnp.float32, SMALL_GPU, HOPPER, ("chunked", 1024)),  # 1.9 GiB
        # bf16/f16: cuDNN where it takes the shape, else the float32 rule
        ((1, 128, 128, 128), jnp.bfloat16, H200, HOPPER, ("dot_product_attention", None)),
        ((2, 5, 7, 16), jnp.bfloat16, H200, HOPPER, ("plain", None)),  # odd N=35
        ((1, 127, 129, 128), jnp.float16, SMALL_GPU, HOPPER, ("chunked", 4096)),  # odd N, 1 GiB budget
        ((2, 6, 8, 12), jnp.bfloat16, H200, HOPPER, ("plain", None)),  # C not a multiple of 8
        ((1, 64, 64, 256), jnp.bfloat16, H200, HOPPER, ("dot_product_attention", None)),
        ((1, 64, 64, 256), jnp.bfloat16, H200, AMPERE, ("plain", None)),  # C > 128 before Hopper
        ((1, 64, 64, 256), jnp.bfloat16, H200, None, ("plain", None)),  # generation unknown: as before Hopper
    ],
)
def test_auto_impl_rule_on_gpu(shape, dtype, memory, capability, expected):
    batch, tokens = shape[0], math.prod(shape[1:-1])
    rule = dict(device_memory=memory, compute_capability=capability)
    assert ga.choose_impl("gpu", batch, tokens, shape[-1], dtype, **rule) == expected
    if capability is not None:  # (resolve_impl fills a missing one in from the GPU present, if any)
        assert ga.resolve_impl("auto", shape, dtype, backend="gpu", **rule) == expected


def test_auto_impl_rule_on_gpu_without_a_reported_memory_assumes_a_small_card():
    rule = ga.choose_impl("gpu", 1, 16384, 128, jnp.float32, device_memory=None)
    assert rule == ga.choose_impl("gpu", 1, 16384, 128, jnp.float32, device_memory=ga.ASSUMED_DEVICE_MEMORY_BYTES)
    assert rule == ("chunked", 4096)


@pytest.mark.parametrize(
    "tokens, channels, dtype, platform, capability, reason",
    [
        (4096, 128, jnp.bfloat16, "gpu", HOPPER, None),
        (2, 8, jnp.float16, "gpu", AMPERE, None),
        (35, 16, jnp.bfloat16, "gpu", HOPPER, r"even, got 35"),
        (4096, 12, jnp.bfloat16, "gpu", HOPPER, r"multiple of 8 and <= 256, got 12"),
        (4096, 264, jnp.bfloat16, "gpu", HOPPER, r"<= 256, got 264"),
        (4096, 256, jnp.bfloat16, "gpu", AMPERE, r"<= 128, got 256"),
        (4096, 128, jnp.float32, "gpu", HOPPER, r"bfloat16/float16 only, got float32"),
        (4096, 128, jnp.bfloat16, "cpu", None, r"GPUs only"),
    ],
)
def test_cudnn_refusal_encodes_the_shape_rules(tokens, channels, dtype, platform, capability, reason):
    refusal = ga.cudnn_refusal(tokens, channels, dtype, platform=platform, compute_capability=capability)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and re.search(reason, refusal)


def test_explicit_dot_product_attention_names_what_cudnn_refuses():
    with pytest.raises(ValueError, match=r"dot_product_attention.*\(2, 5, 7, 16\).*even, got 35.*impl='auto'"):
        ga.resolve_impl("dot_product_attention", (2, 5, 7, 16), jnp.bfloat16, backend="gpu", compute_capability=HOPPER)
    # float32 on a GPU, and every CPU input, take XLA's dot_product_attention: any length.
    assert ga.resolve_impl("dot_product_attention", (2, 5, 7, 16), jnp.float32, backend="gpu") == (
        "dot_product_attention",
        None,
    )
    assert ga.resolve_impl("dot_product_attention", (2, 5, 7, 16), jnp.bfloat16, backend="cpu") == (
        "dot_product_attention",
        None,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="cuDNN's refusals exist on GPUs only")
def test_on_gpu_auto_runs_odd_lengths_and_explicit_cudnn_refuses_them():
    child, parent = (jnp.asarray(x, jnp.bfloat16) for x in _pair((2, 5, 7, 16), seed=8))
    grad = jax.grad(lambda x: jnp.sum(ga.genetic_attention(x, parent).astype(jnp.float32)))(child)
    assert bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))
    with pytest.raises(ValueError, match=r"even, got 35"):
        ga.genetic_attention(child, parent, impl="dot_product_attention")


def test_bench_reports_auto_forward_backward_for_the_device_check(capsys):
    """The JSON key a device check reads: ``auto``'s f+b median of the case named n16384 (tiny here)."""
    from experiments import bench_ga

    report = bench_ga.run({"n16384": (1, (2, 3), 8)}, reps=1, chunk_sizes=(), roofline_size=32, dtype="bfloat16")
    auto = [row for row in report["rows"] if row["impl"] == "auto"]
    assert len(auto) == 1 and auto[0]["dtype"] == "bfloat16" and auto[0]["resolved_impl"] in ga.IMPLS
    assert report["ga_auto_fb_ms_n16384_bf16"] == auto[0]["fwd_bwd_ms"] > 0
    assert "auto=" in capsys.readouterr().out
