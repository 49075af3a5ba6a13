"""A tiny 3-stage conv net: the test bed for the HKT engine.

Stages ("stem", "body", "head"): conv+BN+relu, conv+relu, global pool + linear
(or, with ``per_pixel=True``, a per-pixel linear layer upsampled back to the
input resolution: a toy dense-prediction net). Widths and strides are free, so
a parent/child pair can differ in both at every boundary - exactly what the
Transfer unit must bridge.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ToyStagedNet(nn.Module):
    widths: Sequence[int] = (8, 16)
    strides: Sequence[int] = (1, 1)
    num_classes: int = 4
    per_pixel: bool = False
    dtype: Any = jnp.float32  # activations; parameters stay float32, logits come out float32

    stage_names = ("stem", "body", "head")

    def setup(self):
        self.stem_conv = nn.Conv(
            self.widths[0], (3, 3), strides=self.strides[0], padding=1, use_bias=False, dtype=self.dtype
        )
        self.stem_bn = nn.BatchNorm(momentum=0.9, dtype=self.dtype)
        self.body_conv = nn.Conv(self.widths[1], (3, 3), strides=self.strides[1], padding=1, dtype=self.dtype)
        self.fc = nn.Dense(self.num_classes, dtype=self.dtype)

    def stage(self, index: int, x, *, train: bool):
        if index == 0:
            x = jnp.asarray(x, self.dtype)
            return nn.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        if index == 1:
            return nn.relu(self.body_conv(x))
        if index == 2 and self.per_pixel:
            logits = self.fc(x)
            factor = self.strides[0] * self.strides[1]
            b, h, w, c = logits.shape
            logits = logits.astype(jnp.float32)
            return jax.image.resize(logits, (b, h * factor, w * factor, c), "bilinear") if factor > 1 else logits
        if index == 2:
            return self.fc(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
        raise ValueError(f"ToyStagedNet: stage index {index} out of range for stages {self.stage_names}")

    def __call__(self, x, train: bool = False):
        for index in range(len(self.stage_names)):
            x = self.stage(index, x, train=train)
        return x
