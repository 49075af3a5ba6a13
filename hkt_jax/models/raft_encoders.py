"""RAFT's feature and context encoders (Teed & Deng 2020, Sec. 3.1), channels-last.

Both downsample by 8: a 7x7 stride-2 stem, three stages of two residual blocks
(strides 1, 2, 2) and a 1x1 output conv. The large model uses basic residual
blocks (64/96/128 channels), the small one bottleneck blocks (32/64/96).
Layer names follow princeton-vl/RAFT (``conv1``, ``layer2_0``, ``norm1``...)
so the converters' name table stays one-to-one.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

Norm = Literal["instance", "batch", "none"]

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), as princeton-vl initialises these convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(
    features: int,
    kernel: int | tuple[int, int],
    *,
    stride: int = 1,
    name: str | None = None,
    kernel_init=conv_init,
    dtype: Any = jnp.float32,
) -> nn.Conv:
    """A PyTorch-style conv: explicit symmetric padding kernel // 2 (``"SAME"`` differs for stride 2)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return nn.Conv(
        features,
        (kh, kw),
        strides=(stride, stride),
        padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
        kernel_init=kernel_init,
        dtype=dtype,
        name=name,
    )


def instance_norm(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """``nn.InstanceNorm2d`` defaults: per sample and channel, biased variance, no affine terms.
    Statistics in float32 (at least), the result in ``x``'s dtype."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


def normalize(kind: Norm, name: str, train: bool, dtype: Any = jnp.float32):
    """The encoders' norm layer: instance norm (no parameters), BatchNorm, or nothing.

    Call inside a compact method: the BatchNorm becomes a child of the caller named ``name``.
    """
    if kind == "instance":
        return instance_norm
    if kind == "batch":  # PyTorch BatchNorm2d: momentum 0.1 (= 0.9 here), eps 1e-5
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)
    return lambda x: x


class ResidualBlock(nn.Module):
    """Two 3x3 convs with norm + ReLU, a 1x1 projection when striding, ReLU after the sum."""

    features: int
    norm: Norm
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = conv(self.features, 3, stride=self.stride, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(normalize(self.norm, "norm1", train, self.dtype)(y))
        y = conv(self.features, 3, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(normalize(self.norm, "norm2", train, self.dtype)(y))
        if self.stride != 1:
            x = conv(self.features, 1, stride=self.stride, name="downsample", dtype=self.dtype)(x)
            x = normalize(self.norm, "norm3", train, self.dtype)(x)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """1x1 (features/4) -> 3x3 (strided) -> 1x1 (features), each with norm + ReLU."""

    features: int
    norm: Norm
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = conv(self.features // 4, 1, name="conv1", dtype=self.dtype)(x)
        y = nn.relu(normalize(self.norm, "norm1", train, self.dtype)(y))
        y = conv(self.features // 4, 3, stride=self.stride, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(normalize(self.norm, "norm2", train, self.dtype)(y))
        y = conv(self.features, 1, name="conv3", dtype=self.dtype)(y)
        y = nn.relu(normalize(self.norm, "norm3", train, self.dtype)(y))
        if self.stride != 1:
            x = conv(self.features, 1, stride=self.stride, name="downsample", dtype=self.dtype)(x)
            x = normalize(self.norm, "norm4", train, self.dtype)(x)
        return nn.relu(x + y)


class Encoder(nn.Module):
    """princeton-vl's ``BasicEncoder`` (``small=False``) or ``SmallEncoder`` (``small=True``): x -> x/8."""

    output_dim: int
    norm: Norm
    small: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        stem, widths, block = (32, (32, 64, 96), BottleneckBlock) if self.small else (64, (64, 96, 128), ResidualBlock)
        x = conv(stem, 7, stride=2, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(normalize(self.norm, "norm1", train, self.dtype)(x))
        for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            x = block(width, self.norm, stride, self.dtype, name=f"layer{stage}_0")(x, train=train)
            x = block(width, self.norm, 1, self.dtype, name=f"layer{stage}_1")(x, train=train)
        return conv(self.output_dim, 1, name="conv2", dtype=self.dtype)(x)
