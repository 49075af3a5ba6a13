"""CPU 3x3 convolution kernels (hkt_jax.kernels.cpu_conv) against float64 NumPy formulas and XLA."""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hkt_jax.kernels import build, cpu_conv
from hkt_jax.models import CifarResNet

# Every instruction-set build this CPU can execute: native (AVX-512 here, if present), x86-64-v3 (the
# AVX2 + FMA tiles), x86-64-v2 (the 4-float SSE tiles, as on NEON).
MARCHES = build.runnable_marches()

# The kernels are XLA custom calls registered for the CPU platform: on a GPU/TPU default backend the
# arrays live on the accelerator and there is nothing to test (resolve_conv_impl then picks "xla").
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU convolution kernels: CPU backend only")


@pytest.fixture(scope="module", autouse=True)
def kernels():
    try:
        cpu_conv.load()
        with concurrent.futures.ThreadPoolExecutor(len(MARCHES)) as pool:  # first run: compile them side by side
            libraries = list(pool.map(build.build_library, MARCHES))
    except RuntimeError as err:
        pytest.skip(f"CPU conv kernels cannot be built here: {err}")
    return libraries


def _taps(x64: np.ndarray, stride: int, out_hw: tuple[int, int]):
    """(kh, kw, x window feeding each output pixel for that tap) of a zero-padded NHWC image batch."""
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = out_hw
    for kh in range(3):
        for kw in range(3):
            yield kh, kw, xp[:, kh : kh + stride * (ho - 1) + 1 : stride, kw : kw + stride * (wo - 1) + 1 : stride, :]


def numpy_conv(x, w, stride):
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ho, wo = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
    return sum(np.einsum("bhwi,io->bhwo", win, w64[kh, kw]) for kh, kw, win in _taps(x64, stride, (ho, wo)))


def numpy_weight_grad(x, dy, stride):
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    dw = np.zeros((3, 3, x.shape[-1], dy.shape[-1]))
    for kh, kw, win in _taps(x64, stride, dy.shape[1:3]):
        dw[kh, kw] = np.einsum("bhwi,bhwo->io", win, dy64)
    return dw


def numpy_input_grad(x_shape, w, dy, stride):
    b, h, wd, _ = x_shape
    dxp = np.zeros((b, h + 2, wd + 2, x_shape[-1]))
    w64, dy64 = np.asarray(w, np.float64), np.asarray(dy, np.float64)
    ho, wo = dy.shape[1:3]
    for kh in range(3):
        for kw in range(3):
            dxp[:, kh : kh + stride * (ho - 1) + 1 : stride, kw : kw + stride * (wo - 1) + 1 : stride, :] += np.einsum(
                "bhwo,io->bhwi", dy64, w64[kh, kw]
            )
    return dxp[:, 1:-1, 1:-1, :]


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


CASES = [  # (batch, H, W, Ci, Co, stride): CIFAR widths, the RGB stem, odd / non-square sizes, wide outputs
    (4, 32, 32, 3, 16, 1),
    (4, 16, 16, 16, 16, 1),
    (3, 8, 8, 32, 32, 1),
    (2, 8, 8, 64, 64, 1),
    (3, 16, 16, 16, 32, 2),
    (2, 8, 8, 32, 64, 2),
    (2, 7, 5, 16, 48, 1),
    (2, 7, 9, 24, 32, 2),
    (1, 3, 3, 5, 16, 1),
]


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}w{}ci{}co{}s{}".format(*c))
def test_forward_and_gradients_vs_numpy_float64(case, march):
    b, h, w, ci, co, stride = case
    rng = np.random.default_rng(sum(case))
    x = rng.normal(size=(b, h, w, ci)).astype(np.float32)
    k = rng.normal(size=(3, 3, ci, co)).astype(np.float32)
    policy = cpu_conv.Policy(tuned=False, march=march)
    y, vjp = jax.vjp(lambda x_, k_: cpu_conv.conv3x3(x_, k_, stride, policy), jnp.asarray(x), jnp.asarray(k))
    dy = rng.normal(size=y.shape).astype(np.float32)
    dx, dk = vjp(jnp.asarray(dy))
    assert y.shape == (b, (h - 1) // stride + 1, (w - 1) // stride + 1, co)
    assert _rel(y, numpy_conv(x, k, stride)) < 1e-5
    assert _rel(dk, numpy_weight_grad(x, dy, stride)) < 1e-5
    assert _rel(dx, numpy_input_grad(x.shape, k, dy, stride)) < 1e-5


def test_every_variant_runs_its_own_tiles():
    """Each build registered its own targets and was compiled for the vector width its target has."""
    libraries = [cpu_conv.load(m) for m in MARCHES]
    assert len({lib.fwd for lib in libraries}) == len(libraries)
    widths = {lib.march: lib.vector_floats for lib in libraries}
    assert widths.get("x86-64-v3", 8) == 8 and widths.get("x86-64-v2", 4) == 4
    if "avx512f" in build.cpu_info.cpu_flags() and build.default_march() == "native":
        assert widths["native"] == 16


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize(
    "residual,relu,stride", [(False, True, 1), (True, True, 1), (False, False, 2), (True, False, 1)]
)
def test_fused_bias_residual_relu_vs_numpy(residual, relu, stride, march):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 10, 10, 16)).astype(np.float32)
    k = rng.normal(size=(3, 3, 16, 32)).astype(np.float32)
    bias = rng.normal(size=(32,)).astype(np.float32)
    want = numpy_conv(x, k, stride) + bias
    res = rng.normal(size=want.shape).astype(np.float32) if residual else None
    want = want + (res if residual else 0)
    want = np.maximum(want, 0) if relu else want
    policy = cpu_conv.Policy(tuned=False, march=march)
    fused = jax.jit(lambda *a: cpu_conv.conv3x3_bias_act(*a, stride=stride, relu=relu, policy=policy))
    assert cpu_conv.load(march).fused in fused.lower(x, k, bias, res).as_text()
    assert _rel(fused(x, k, bias, res), want) < 1e-5
    if march != MARCHES[0]:
        return  # the gradients below are XLA's whatever the build
    # gradients (not what the fused form is for, but they must be right when asked for)
    args = tuple(jnp.asarray(a) for a in (x, k, bias))
    f = lambda *a: jnp.sum(jnp.sin(cpu_conv.conv3x3_bias_act(*a, res, stride=stride, relu=relu)))
    g = lambda *a: jnp.sum(jnp.sin(cpu_conv.conv3x3_bias_act_reference(*a, res, stride=stride, relu=relu)))
    for a, r in zip(jax.grad(f, (0, 1, 2))(*args), jax.grad(g, (0, 1, 2))(*args)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), kernel=5),  # 5x5
        dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), co=8),  # Co % 16 != 0
        dict(window_strides=(1, 1), padding="SAME"),  # string padding
        dict(window_strides=(3, 3), padding=((1, 1), (1, 1))),  # stride 3
        dict(window_strides=(1, 1), padding=((2, 2), (2, 2)), rhs_dilation=(2, 2)),  # dilated
        dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16),  # not float32
    ],
)
def test_drop_in_falls_back_to_xla_where_kernels_do_not_apply(kwargs):
    kwargs = dict(kwargs)
    kernel, co, dtype = kwargs.pop("kernel", 3), kwargs.pop("co", 16), kwargs.pop("dtype", jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 16)), dtype)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 16, co)), dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    assert not cpu_conv.kernel_applies(x, k, dimension_numbers=dn, **kwargs)
    got = cpu_conv.conv_general_dilated(x, k, dimension_numbers=dn, **kwargs)
    want = lax.conv_general_dilated(x, k, dimension_numbers=dn, **kwargs)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_drop_in_uses_kernel_for_nhwc_3x3():
    x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert cpu_conv.kernel_applies(x, k, **args)
    assert not cpu_conv.kernel_applies(x, k, **{**args, "dimension_numbers": ("NCHW", "OIHW", "NCHW")})
    text = jax.jit(lambda a, b: cpu_conv.conv_general_dilated(a, b, **args)).lower(x, k).as_text()
    assert "hkt_conv3x3_fwd" in text


@pytest.mark.parametrize("folded", [False, True])
def test_resnet_with_kernels_matches_xla(folded):
    """Same parameters, same logits and gradients whichever convolutions run (training BN and folded BN)."""
    make = lambda impl: CifarResNet(depth=8, conv_impl=impl, bn_folded=folded)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = make("xla").init(jax.random.key(0), x)
    assert "hkt_conv3x3" in jax.jit(lambda v: make("cpu_kernel").apply(v, x)).lower(variables).as_text()
    if folded:
        outs = [make(impl).apply(variables, x) for impl in ("cpu_kernel", "xla")]
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        return

    def loss(params, impl):
        logits, _ = make(impl).apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    (l_k, g_k), (l_x, g_x) = (jax.value_and_grad(loss)(variables["params"], impl) for impl in ("cpu_kernel", "xla"))
    np.testing.assert_allclose(l_k, l_x, rtol=1e-5)
    # Rounding-level differences (~1e-6) can flip a ReLU whose input is that close to zero, which changes
    # the gradient around that pixel (here: one pre-activation within 1e-5 of zero, up to 0.9% of a
    # gradient's norm). A wrong kernel is off by O(1). The exact checks are the NumPy tests above.
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_x)):
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
    np.testing.assert_allclose(g_k["fc"]["kernel"], g_x["fc"]["kernel"], rtol=1e-4, atol=1e-6)


def test_vmap_runs_the_kernel_per_example():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 2, 6, 6, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 16)), jnp.float32)
    got = jax.vmap(lambda xb: cpu_conv.conv3x3(xb, k, 1))(x)
    for i in range(3):
        assert _rel(got[i], numpy_conv(np.asarray(x[i]), np.asarray(k), 1)) < 1e-5


def test_resolve_conv_impl():
    assert cpu_conv.resolve_conv_impl("xla") == "xla"
    assert cpu_conv.resolve_conv_impl("cpu_kernel") == "cpu_kernel"
    expected = "cpu_kernel" if jax.default_backend() == "cpu" and jax.device_count() == 1 else "xla"
    assert cpu_conv.resolve_conv_impl("auto") == expected
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        cpu_conv.resolve_conv_impl("onednn")


def test_build_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HKT_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.raises(RuntimeError, match="compiling conv3x3_cpu.cc failed"):
        cpu_conv.build_library()
    assert not list(tmp_path.glob("*.so"))


def test_weight_gradient_is_bit_reproducible_across_calls():
    """The weight gradient sums images in fixed chunks and order, whatever thread runs them: repeated
    calls (and so a run resumed in another process) give bit-identical results."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(32, 16, 16, 16)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, 16, 16)).astype(np.float32))
    dy = jnp.asarray(rng.normal(size=(32, 16, 16, 16)).astype(np.float32))
    policy = cpu_conv.Policy(tuned=False, march=MARCHES[0])
    grad = jax.jit(lambda x_, k_, dy_: jax.vjp(lambda kk: cpu_conv.conv3x3(x_, kk, 1, policy), k_)[1](dy_)[0])
    first = np.asarray(grad(x, k, dy))
    for _ in range(20):
        np.testing.assert_array_equal(np.asarray(grad(x, k, dy)), first)
