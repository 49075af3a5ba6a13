"""Fast 3x3 convolutions on CPU: a drop-in for ``lax.conv_general_dilated`` in flax ``nn.Conv``.

Why: on CPU, XLA runs the narrow 3x3 convolutions of CIFAR ResNets (16-64 channels) -- and above all their
weight gradients -- several times slower than PyTorch's oneDNN, which makes JAX CPU training slow. The
kernels in ``conv3x3_cpu.cc`` (forward and weight gradient, float32, NHWC/HWIO, padding 1, stride 1 or 2)
are compiled for the host CPU on first use with the system C++ compiler, cached, and called through the
XLA FFI (``build.py``). The input gradient of a stride-1 convolution is the forward kernel on the output
gradient with the kernel flipped and transposed; strided input gradients stay with XLA.

``conv_general_dilated(...)`` takes exactly ``lax.conv_general_dilated``'s arguments and uses the kernels
only where they apply (CPU backend, one device, float32, 3x3, stride 1/2, padding 1, NHWC, output channels
a multiple of 16); anything else goes to XLA unchanged. On GPU/TPU, or with several devices (the custom
call does not shard), it is plain XLA. ``resolve_conv_impl("auto")`` says whether a run gets the kernels
at all; with ``auto`` each convolution and direction then runs the kernel only where timing on this
machine found it faster than XLA (``conv_tuning.py``); ``cpu_kernel`` runs them wherever they apply.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hkt_jax.kernels import build, conv_tuning
from hkt_jax.kernels.build import SOURCE, build_library, cache_dir  # noqa: F401 -- re-exported

CONV_IMPLS = ("auto", "xla", "cpu_kernel")
FWD_TARGET, DW_TARGET, FUSED_TARGET = build.FWD_TARGET, build.DW_TARGET, build.FUSED_TARGET
NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which of the convolutions the kernels take run them: the tuned ones (``tuned``) or all, and which
    build (``march``; None: ``$HKT_JAX_KERNEL_MARCH`` or native)."""

    tuned: bool = False
    march: str | None = None


KERNEL, TUNED = Policy(tuned=False), Policy(tuned=True)


def load(march: str | None = None) -> build.KernelLibrary:
    """Build (if needed), load and register the FFI targets. Raises RuntimeError when impossible here."""
    return build.load(march)


@functools.cache
def kernels_available() -> bool:
    try:
        load()
        return True
    except (RuntimeError, OSError) as err:
        warnings.warn(f"hkt_jax: fast CPU convolutions unavailable, using XLA's ({err})", stacklevel=2)
        return False


def resolve_conv_impl(conv_impl: str) -> str:
    """``auto`` -> ``cpu_kernel`` on a single-device CPU run where the kernels build, else ``xla``.
    (With ``auto`` each convolution is then tuned: see ``conv_fn``.)"""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if conv_impl == "auto":
        single_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
        return "cpu_kernel" if single_cpu and kernels_available() else "xla"
    if conv_impl == "cpu_kernel":
        load()
    return conv_impl


def policy_for(conv_impl: str) -> Policy | None:
    """None (XLA's convolutions), ``TUNED`` for ``auto`` with the kernels available, ``KERNEL`` when forced."""
    if resolve_conv_impl(conv_impl) == "xla":
        return None
    return TUNED if conv_impl == "auto" else KERNEL


def conv_fn(conv_impl: str):
    """What ``nn.Conv(conv_general_dilated=...)`` should get for ``conv_impl`` (None: flax's default)."""
    policy = policy_for(conv_impl)
    return None if policy is None else _with_policy(conv_general_dilated, policy)


@functools.cache
def _with_policy(fn, policy: Policy):  # one object per policy: flax modules compare and hash their fields
    return functools.partial(fn, policy=policy)


def _threads() -> int:
    return conv_tuning._threads()


def _call(target: str, out: jax.ShapeDtypeStruct, *operands, stride: int, **attrs) -> jax.Array:
    """One kernel call; vmapped, it runs once per example."""
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        *operands, stride=np.int32(stride), threads=np.int32(_threads()), **attrs
    )


def _output_shape(x_shape, w_shape, stride: int) -> tuple[int, int, int, int]:
    b, h, wd, _ = x_shape
    return b, (h - 1) // stride + 1, (wd - 1) // stride + 1, w_shape[-1]


def _output_struct(x: jax.Array, w: jax.Array, stride: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(_output_shape(x.shape, w.shape, stride), jnp.float32)


def _flops(x_shape, w_shape, stride: int) -> float:
    return 2.0 * 9 * float(np.prod(_output_shape(x_shape, w_shape, stride))) * x_shape[-1]


# -- the candidates, as functions of concrete or traced arrays -----------------------------------------


def _kernel_forward(x, w, stride, march=None):
    return _call(load(march).fwd, _output_struct(x, w, stride), x, w, stride=stride)


def _kernel_input_grad(dy, w, march=None):  # stride 1 only
    return _kernel_forward(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), 1, march)


def _kernel_weight_grad(x, dy, stride, march=None):
    out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], dy.shape[-1]), jnp.float32)
    return _call(load(march).weight_grad, out, x, dy, stride=stride)


def _xla_conv(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO)


def _xla_input_grad(dy, w, x_shape, stride):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.linear_transpose(lambda x_: _xla_conv(x_, w, stride), x)(dy)[0]


def _xla_weight_grad(x, dy, w_shape, stride):
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    return jax.linear_transpose(lambda w_: _xla_conv(x, w_, stride), w)(dy)[0]


DIRECTIONS = ("forward", "input_grad", "weight_grad", "fused", "fused_residual")


def candidates(direction: str, x_shape, w_shape, stride: int, march: str | None = None, relu: bool = True):
    """({"kernel": f, "xla": g}, operand shapes) of one convolution direction: what the tuner times.
    input_grad takes (dy, w), weight_grad (x, dy), forward (x, w), fused (x, w, bias[, residual])."""
    x_shape, w_shape = tuple(x_shape), tuple(w_shape)
    y_shape = _output_shape(x_shape, w_shape, stride)
    if direction == "forward":
        return {
            "kernel": lambda x, w: _kernel_forward(x, w, stride, march),
            "xla": lambda x, w: _xla_conv(x, w, stride),
        }, (x_shape, w_shape)
    if direction == "input_grad":  # the kernel takes stride 1 only
        return {
            "kernel": lambda dy, w: _kernel_input_grad(dy, w, march),
            "xla": lambda dy, w: _xla_input_grad(dy, w, x_shape, stride),
        }, (y_shape, w_shape)
    if direction == "weight_grad":
        return {
            "kernel": lambda x, dy: _kernel_weight_grad(x, dy, stride, march),
            "xla": lambda x, dy: _xla_weight_grad(x, dy, w_shape, stride),
        }, (x_shape, y_shape)
    if direction in ("fused", "fused_residual"):
        residual = direction == "fused_residual"
        kernel = lambda x, w, b, *r: _kernel_bias_act(x, w, b, r[0] if r else None, stride, relu, march)
        xla = lambda x, w, b, *r: conv3x3_bias_act_reference(x, w, b, r[0] if r else None, stride=stride, relu=relu)
        return {"kernel": kernel, "xla": xla}, (x_shape, w_shape, (w_shape[-1],)) + ((y_shape,) if residual else ())
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def kernel_chosen(policy: Policy, direction: str, x_shape, w_shape, stride: int, relu: bool = True) -> bool:
    """Whether this convolution direction runs the kernel under ``policy`` (tuning it on first use)."""
    if not policy.tuned:
        return True
    key = (
        f"{direction}{'' if relu else '_linear'} x={'x'.join(map(str, x_shape))} "
        f"w={'x'.join(map(str, w_shape))} s={stride}"
    )
    make = functools.partial(candidates, direction, x_shape, w_shape, stride, policy.march, relu)
    return conv_tuning.use_kernel(key, _flops(x_shape, w_shape, stride), load(policy.march), make)


def _forward(x, w, stride, policy: Policy):
    if kernel_chosen(policy, "forward", x.shape, w.shape, stride):
        return _kernel_forward(x, w, stride, policy.march)
    return _xla_conv(x, w, stride)


def _input_grad(x_shape, w, dy, stride, policy: Policy):
    if stride == 1 and x_shape[-1] % 16 == 0 and kernel_chosen(policy, "input_grad", x_shape, w.shape, 1):
        return _kernel_input_grad(dy, w, policy.march)
    return _xla_input_grad(dy, w, x_shape, stride)


def _weight_grad(x, w_shape, dy, stride, policy: Policy):
    if kernel_chosen(policy, "weight_grad", x.shape, w_shape, stride):
        return _kernel_weight_grad(x, dy, stride, policy.march)
    return _xla_weight_grad(x, dy, w_shape, stride)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3(x: jax.Array, w: jax.Array, stride: int = 1, policy: Policy = KERNEL) -> jax.Array:
    """3x3 convolution, padding 1, NHWC x HWIO -> NHWC, float32, ``w.shape[-1] % 16 == 0``; each direction
    on the kernel or XLA as ``policy`` says."""
    return _forward(x, w, stride, policy)


def _conv3x3_fwd(x, w, stride, policy):
    return _forward(x, w, stride, policy), (x, w)


def _conv3x3_bwd(stride, policy, residuals, dy):
    x, w = residuals
    return (_input_grad(tuple(x.shape), w, dy, stride, policy), _weight_grad(x, tuple(w.shape), dy, stride, policy))


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def conv3x3_bias_act_reference(x, w, bias, residual=None, *, stride=1, relu=True):
    y = _xla_conv(x, w, stride) + bias
    y = y if residual is None else y + residual
    return jax.nn.relu(y) if relu else y


def _kernel_bias_act(x, w, bias, residual, stride, relu, march=None):
    operands = (x, w, bias, jnp.zeros((0,), jnp.float32) if residual is None else residual)
    return _call(
        load(march).fused,
        _output_struct(x, w, stride),
        *operands,
        stride=stride,
        relu=np.int32(relu),
        has_residual=np.int32(residual is not None),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bias_act(x, w, bias, residual, stride, relu, march):
    return _kernel_bias_act(x, w, bias, residual, stride, relu, march)


def _bias_act_fwd(x, w, bias, residual, stride, relu, march):
    return _bias_act(x, w, bias, residual, stride, relu, march), (x, w, bias, residual)


def _bias_act_bwd(stride, relu, march, residuals, dy):
    # Inference is what the fused form is for (a frozen, BatchNorm-folded parent); gradients, when asked
    # for, come from the XLA formulation of the same function.
    f = functools.partial(conv3x3_bias_act_reference, stride=stride, relu=relu)
    return jax.vjp(f, *residuals)[1](dy)


_bias_act.defvjp(_bias_act_fwd, _bias_act_bwd)


def conv3x3_bias_act(x, w, bias, residual=None, *, stride=1, relu=True, policy: Policy = KERNEL):
    """``relu?(conv3x3(x, w) + bias (+ residual))`` in one pass when the kernel applies (and, with a tuned
    ``policy``, was faster here than XLA's fused convolution), else XLA."""
    if not (
        kernel_applies(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC_HWIO)
        and (bias.dtype == jnp.float32 and (residual is None or residual.dtype == jnp.float32))
    ):
        return conv3x3_bias_act_reference(x, w, bias, residual, stride=stride, relu=relu)
    direction = "fused" if residual is None else "fused_residual"
    if kernel_chosen(policy, direction, x.shape, w.shape, stride, relu):
        return _bias_act(x, w, bias, residual, stride, relu, policy.march)
    return conv3x3_bias_act_reference(x, w, bias, residual, stride=stride, relu=relu)


def bias_act_fn(conv_impl: str):
    """``conv3x3_bias_act`` as ``conv_impl`` says, or None for the XLA formulation."""
    policy = policy_for(conv_impl)
    return None if policy is None else _with_policy(conv3x3_bias_act, policy)


def kernel_applies(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
) -> bool:
    """Whether ``conv3x3`` computes exactly this ``lax.conv_general_dilated`` call."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers or ("NCHW", "OIHW", "NCHW"))
    if given != expected:
        return False
    strides = tuple(window_strides)
    return (
        tuple(rhs.shape[:2]) == (3, 3)
        and rhs.shape[2] == lhs.shape[3]
        and rhs.shape[3] % 16 == 0
        and strides in ((1, 1), (2, 2))
        and not isinstance(padding, str)
        and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1
        and batch_group_count == 1
    )


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    *,
    policy: Policy = KERNEL,
):
    """``lax.conv_general_dilated`` that runs the CPU kernels where they apply (see module docstring)."""
    if preferred_element_type in (None, jnp.float32) and kernel_applies(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
    ):
        return conv3x3(lhs, rhs, int(window_strides[0]), policy)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )
