"""Fast 3x3 convolutions on CPU: a drop-in for ``lax.conv_general_dilated`` in flax ``nn.Conv``.

Why: on CPU, XLA runs the narrow 3x3 convolutions of CIFAR ResNets (16-64 channels) -- and above all their
weight gradients -- several times slower than PyTorch's oneDNN, which makes JAX CPU training slow. The
kernels in ``conv3x3_cpu.cc`` (forward and weight gradient, float32, NHWC/HWIO, padding 1, stride 1 or 2)
are compiled for the host CPU on first use with the system C++ compiler, cached, and called through the
XLA FFI. The input gradient of a stride-1 convolution is the forward kernel on the output gradient with
the kernel flipped and transposed; strided input gradients stay with XLA.

``conv_general_dilated(...)`` takes exactly ``lax.conv_general_dilated``'s arguments and uses the kernels
only where they apply (CPU backend, one device, float32, 3x3, stride 1/2, padding 1, NHWC, output channels
a multiple of 16); anything else goes to XLA unchanged. On GPU/TPU, or with several devices (the custom
call does not shard), it is plain XLA. ``resolve_conv_impl("auto")`` says which one a run gets.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("auto", "xla", "cpu_kernel")
SOURCE = Path(__file__).with_name("conv3x3_cpu.cc")
FWD_TARGET, DW_TARGET, FUSED_TARGET = "hkt_conv3x3_fwd", "hkt_conv3x3_weight_grad", "hkt_conv3x3_bias_act"
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def cache_dir() -> Path:
    return Path(os.environ.get("HKT_JAX_KERNEL_CACHE", Path.home() / ".cache" / "hkt_jax" / "kernels"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build_key(compiler: str, flags: list[str]) -> str:
    """Hash of everything the binary depends on: source, compiler and flags, jax version (its FFI headers), host CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([compiler, *flags, jax.__version__, platform.machine()]).encode())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        digest.update(version.encode())
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
        digest.update("\n".join(sorted({l for l in cpu.splitlines() if l.startswith(("model name", "flags"))})).encode())
    except (OSError, subprocess.SubprocessError):
        pass
    return digest.hexdigest()[:16]


def build_library() -> Path:
    """Compile ``conv3x3_cpu.cc`` for this CPU (once; cached by content hash). Raises RuntimeError on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-isystem", jax.ffi.include_dir()]
    target = cache_dir() / f"conv3x3_cpu-{_build_key(compiler, flags)}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-4000:]}")
            os.replace(built, target)  # atomic: concurrent builders (pytest-xdist workers) never see half a file
    except OSError as err:
        raise RuntimeError(f"cannot build {SOURCE.name} in {target.parent} (set HKT_JAX_KERNEL_CACHE): {err}") from err
    return target


@functools.cache
def load() -> None:
    """Build (if needed), load and register the FFI targets. Raises RuntimeError when impossible here."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise RuntimeError(f"the CPU conv kernels are built for Linux x86-64/aarch64, not {platform.system()} "
                           f"{platform.machine()}")
    library = ctypes.cdll.LoadLibrary(str(build_library()))
    jax.ffi.register_ffi_target(FWD_TARGET, jax.ffi.pycapsule(library.HktConv3x3Fwd), platform="cpu")
    jax.ffi.register_ffi_target(DW_TARGET, jax.ffi.pycapsule(library.HktConv3x3WeightGrad), platform="cpu")
    jax.ffi.register_ffi_target(FUSED_TARGET, jax.ffi.pycapsule(library.HktConv3x3BiasAct), platform="cpu")


@functools.cache
def kernels_available() -> bool:
    try:
        load()
        return True
    except (RuntimeError, OSError) as err:
        warnings.warn(f"hkt_jax: fast CPU convolutions unavailable, using XLA's ({err})", stacklevel=2)
        return False


def resolve_conv_impl(conv_impl: str) -> str:
    """``auto`` -> ``cpu_kernel`` on a single-device CPU run where the kernels build, else ``xla``."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
        return "cpu_kernel" if single_cpu and kernels_available() else "xla"
    if conv_impl == "cpu_kernel":
        load()
    return conv_impl


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _call(target: str, out: jax.ShapeDtypeStruct, *operands, stride: int, **attrs) -> jax.Array:
    """One kernel call; vmapped, it runs once per example."""
    load()
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        *operands, stride=np.int32(stride), threads=np.int32(_threads()), **attrs)


def _output_struct(x: jax.Array, w: jax.Array, stride: int) -> jax.ShapeDtypeStruct:
    b, h, wd, _ = x.shape
    return jax.ShapeDtypeStruct((b, (h - 1) // stride + 1, (wd - 1) // stride + 1, w.shape[-1]), jnp.float32)


def _forward(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return _call(FWD_TARGET, _output_struct(x, w, stride), x, w, stride=stride)


def _weight_grad(x: jax.Array, dy: jax.Array, stride: int) -> jax.Array:
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return _call(DW_TARGET, out, x, dy, stride=stride)


def _xla_conv(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """3x3 convolution, padding 1, NHWC x HWIO -> NHWC, float32, ``w.shape[-1] % 16 == 0``."""
    return _forward(x, w, stride)


def _conv3x3_fwd(x, w, stride):
    return _forward(x, w, stride), (x, w)


def _conv3x3_bwd(stride, residuals, dy):
    x, w = residuals
    dw = _weight_grad(x, dy, stride)
    if stride == 1 and x.shape[-1] % 16 == 0:
        dx = _forward(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), 1)
    else:
        dx = jax.vjp(lambda x_: _xla_conv(x_, w, stride), x)[1](dy)[0]
    return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3_bias_act_reference(x, w, bias, residual=None, *, stride=1, relu=True):
    y = _xla_conv(x, w, stride) + bias
    y = y if residual is None else y + residual
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _bias_act(x, w, bias, residual, stride, relu):
    operands = (x, w, bias, jnp.zeros((0,), jnp.float32) if residual is None else residual)
    return _call(FUSED_TARGET, _output_struct(x, w, stride), *operands, stride=stride, relu=np.int32(relu),
                 has_residual=np.int32(residual is not None))


def _bias_act_fwd(x, w, bias, residual, stride, relu):
    return _bias_act(x, w, bias, residual, stride, relu), (x, w, bias, residual)


def _bias_act_bwd(stride, relu, residuals, dy):
    # Inference is what the fused form is for (a frozen, BatchNorm-folded parent); gradients, when asked
    # for, come from the XLA formulation of the same function.
    f = functools.partial(conv3x3_bias_act_reference, stride=stride, relu=relu)
    return jax.vjp(f, *residuals)[1](dy)


_bias_act.defvjp(_bias_act_fwd, _bias_act_bwd)


def conv3x3_bias_act(x, w, bias, residual=None, *, stride=1, relu=True):
    """``relu?(conv3x3(x, w) + bias (+ residual))`` in one pass when the kernel applies, else XLA."""
    if kernel_applies(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO) and (
            bias.dtype == jnp.float32 and (residual is None or residual.dtype == jnp.float32)):
        return _bias_act(x, w, bias, residual, stride, relu)
    return conv3x3_bias_act_reference(x, w, bias, residual, stride=stride, relu=relu)


def kernel_applies(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, batch_group_count=1) -> bool:
    """Whether ``conv3x3`` computes exactly this ``lax.conv_general_dilated`` call."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or ("NCHW", "OIHW", "NCHW"))
    if given != expected:
        return False
    strides = tuple(window_strides)
    return (tuple(rhs.shape[:2]) == (3, 3) and rhs.shape[2] == lhs.shape[3] and rhs.shape[3] % 16 == 0
            and strides in ((1, 1), (2, 2)) and not isinstance(padding, str)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
            and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
            and feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``lax.conv_general_dilated`` that runs the CPU kernels where they apply (see module docstring)."""
    if preferred_element_type in (None, jnp.float32) and kernel_applies(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count):
        return conv3x3(lhs, rhs, int(window_strides[0]))
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
