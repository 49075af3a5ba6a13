"""2D U-Nets for segmentation, staged for HKT: ("encoder", "bottleneck", "decoder").

Topology (Ronneberger et al. 2015, with BatchNorm and same-padding): each
encoder level is (3x3 conv - BN - ReLU) x 2, then a 2x2 max-pool; the
bottleneck is one more double conv at the lowest resolution; each decoder
level is a 2x2 stride-2 transposed conv, concatenation with the encoder's skip
features ([skip, upsampled], skip first), and a double conv; a 1x1 conv gives
the logits. Inputs are ``(B, H, W, in_channels)`` with H and W multiples of
``2 ** depth``; logits are ``(B, H, W, num_classes)`` float32.

Stage outputs are pytrees so HKT can mix the skips as well as the bottom
features (leaf paths for ``hkt.LeafLink``: ``"x"``, ``"skips/0"`` ...):

* encoder    -> ``{"skips": (s_0, ..., s_{L-1}), "x": max_pool(s_{L-1})}``,
  ``s_i`` at resolution ``H / 2**i`` with ``level_widths[i]`` channels;
* bottleneck -> ``{"skips": (same), "x": features at H / 2**L}``;
* decoder    -> logits.

Parameter counts (in_channels=1, num_classes=3; ``parameter_count`` of ``params``;
tests/test_unet.py checks them against an independent formula and PyTorch):

* ``UNet()`` (widths 64-128-256-512, bottleneck 1024): 31,036,611
* ``PocketNet(width=32, depth=4)``: 211,587;  ``PocketNet(width=16, depth=4)``: 53,315

PocketNet (Celaya et al. 2022) keeps one width at every level, which is why it
stays far under 1M parameters. (The HKT paper quotes 0.8M for its PocketNet
without giving width, depth or dimensionality; this 2D form has 0.21M at width 32.)
``DenseUNet`` swaps the encoder's double convs for dense blocks (count in its docstring).
Module names are chosen so a PyTorch U-Net converts by a table
(``hkt_jax.convert.unet``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from hkt_jax.engine.stages import Boundary, LeafLink

STAGE_NAMES = ("encoder", "bottleneck", "decoder")

conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torch kaiming_normal_


class DoubleConv(nn.Module):
    """(3x3 conv, no bias - BatchNorm - ReLU) x 2; BN as PyTorch's defaults (momentum 0.1, eps 1e-5)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in (1, 2):
            x = nn.Conv(
                self.features,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=conv_init,
                dtype=self.dtype,
                name=f"conv{i}",
            )(x)
            x = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(
                x, use_running_average=not train
            )
            x = nn.relu(x)
        return x


def _check_input(model_name: str, x: jax.Array, in_channels: int, depth: int) -> None:
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"{model_name}: input must be (B, H, W, {in_channels}), got {tuple(x.shape)}")
    step = 2**depth
    if x.shape[1] % step or x.shape[2] % step:
        raise ValueError(
            f"{model_name}: H and W must be multiples of 2**depth = {step} "
            f"(one halving per level), got {tuple(x.shape[1:3])}"
        )


class StagedUNet(nn.Module):
    """The shared U-Net body; subclasses say the width of every level.

    Subclasses define the dataclass fields and two properties:
    ``level_widths`` (encoder/decoder widths, top level first) and
    ``bottleneck_width``.
    """

    stage_names = STAGE_NAMES

    @property
    def level_widths(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def bottleneck_width(self) -> int:
        raise NotImplementedError

    def encoder_block(self, features: int, name: str) -> nn.Module:
        """The block of an encoder level and of the bottleneck (DenseUNet swaps it)."""
        return DoubleConv(features, self.dtype, name=name)

    def setup(self):
        widths = self.level_widths
        if not widths or min(widths) < 1 or self.bottleneck_width < 1:
            raise ValueError(
                f"{type(self).__name__}: widths must be positive, got levels {widths} "
                f"and bottleneck {self.bottleneck_width}"
            )
        if self.num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {self.num_classes}")
        self.encoders = [self.encoder_block(w, f"encoder_{i}") for i, w in enumerate(widths)]
        self.bottleneck = self.encoder_block(self.bottleneck_width, "bottleneck")
        # PyTorch ConvTranspose2d semantics (kernel stored as (kh, kw, out, in); see convert/unet.py).
        self.ups = [
            nn.ConvTranspose(
                w, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True, dtype=self.dtype, name=f"up_{i}"
            )
            for i, w in enumerate(widths)
        ]
        self.decoders = [DoubleConv(w, self.dtype, name=f"decoder_{i}") for i, w in enumerate(widths)]
        self.head = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")

    def stage(self, index: int, x, *, train: bool):
        if not 0 <= index < len(STAGE_NAMES):
            raise ValueError(f"{type(self).__name__}: stage index {index} out of range for stages {STAGE_NAMES}")
        if index == 0:
            _check_input(type(self).__name__, x, self.in_channels, len(self.level_widths))
            skips = []
            h = jnp.asarray(x, self.dtype)  # the image in the compute dtype (a no-op in float32)
            for level, encoder in enumerate(self.encoders):
                if level:
                    h = nn.max_pool(h, (2, 2), strides=(2, 2))
                h = encoder(h, train=train)
                skips.append(h)
            return {"skips": tuple(skips), "x": nn.max_pool(h, (2, 2), strides=(2, 2))}
        if index == 1:
            return {"skips": tuple(x["skips"]), "x": self.bottleneck(x["x"], train=train)}
        h = x["x"]
        for level in reversed(range(len(self.level_widths))):
            up = self.ups[level](h)
            h = self.decoders[level](jnp.concatenate([x["skips"][level], up], axis=-1), train=train)
        return self.head(h).astype(jnp.float32)

    def hkt_boundaries(self, stages: int | None = None, skips: Sequence[int] = ()) -> tuple:
        """HKT wiring for a U-Net pair (``hkt_jax.training.factories`` asks for it when ``hkt.boundaries`` is unset):
        the bottom features ``"x"`` - spatial softmax GA over (H / 2**depth)^2 tokens - plus the skip
        levels ``skips`` (N = (H / 2**level)^2: the chunked GA takes over where N is large), both
        directions. ``stages`` = 3 (default, 3HKT): after the encoder and after the bottleneck; 2 (2HKT):
        after the bottleneck only. Transfer adapters bridge the widths (and depths, by resizing)."""
        links = tuple(LeafLink(leaf, (leaf,)) for leaf in ("x", *(f"skips/{level}" for level in skips)))
        mixed = Boundary(to_child=links, to_parent=links)
        if stages in (None, 3):
            return (mixed, mixed)
        if stages == 2:
            return (Boundary(backbone=False, head=False, to_child=(), to_parent=()), mixed)
        raise ValueError(
            f"hkt.stages={stages}: a U-Net supports 3 (3HKT: after encoder and bottleneck) or 2 "
            "(2HKT: after the bottleneck)"
        )

    def __call__(self, x, train: bool = False):
        for index in range(len(STAGE_NAMES)):
            x = self.stage(index, x, train=train)
        return x


class UNet(StagedUNet):
    """Classic U-Net: widths double per level, bottleneck ``2 * widths[-1]`` unless given.

    ``apply(v, x, train=False)`` -> logits ``(B, H, W, num_classes)``.
    """

    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 3
    in_channels: int = 1
    bottleneck_features: int | None = None
    dtype: Any = jnp.float32

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.widths)

    @property
    def bottleneck_width(self) -> int:
        return int(self.bottleneck_features or 2 * self.level_widths[-1])


class PocketNet(StagedUNet):
    """U-Net with one ``width`` at every level and at the bottleneck (Celaya et al. 2022).

    ``depth`` = number of 2x down-samplings. Well under 1M parameters: 211,587 for
    width 32 and 53,315 for width 16 at depth 4 (1 input channel, 3 classes).
    """

    width: int = 32
    depth: int = 4
    num_classes: int = 3
    in_channels: int = 1
    dtype: Any = jnp.float32

    @property
    def level_widths(self) -> tuple[int, ...]:
        return (int(self.width),) * int(self.depth)

    @property
    def bottleneck_width(self) -> int:
        return int(self.width)


class DenseBlock(nn.Module):
    """Densely connected block (Huang et al. 2017): ``layers`` x (BN - ReLU - 3x3 conv to ``growth``
    channels, concatenated to its input), then a 1x1 conv - BN - ReLU transition to ``features``."""

    features: int
    growth: int = 16
    layers: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in range(self.layers):
            y = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(
                x, use_running_average=not train
            )
            y = nn.Conv(
                self.growth,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                kernel_init=conv_init,
                dtype=self.dtype,
                name=f"conv{i}",
            )(nn.relu(y))
            x = jnp.concatenate([x, y], axis=-1)
        x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="transition")(
            x
        )
        return nn.relu(
            nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="transition_bn")(
                x, use_running_average=not train
            )
        )


class DenseUNet(UNet):
    """2D DenseUNet (the 2D branch of H-DenseUNet, Li et al. 2018, at U-Net scale): dense blocks in the
    encoder and bottleneck, the U-Net decoder. Same stages and pytree outputs as ``UNet``.

    ``DenseUNet()`` (widths 64-128-256-512, bottleneck 1024, growth 32, 4 layers; 1 input
    channel, 3 classes): 14,538,059 parameters.
    """

    growth: int = 32
    layers_per_block: int = 4

    def encoder_block(self, features: int, name: str) -> nn.Module:
        return DenseBlock(features, self.growth, self.layers_per_block, self.dtype, name=name)
