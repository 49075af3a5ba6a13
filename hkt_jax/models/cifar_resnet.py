"""CIFAR ResNets (He et al. 2016, Sec. 4.2): depth 6n+2, three groups of n basic blocks.

The layout follows the common pretrained PyTorch CIFAR ResNets (16/32/64
channels, 3x3 convs with symmetric padding 1, option-A shortcuts) so their
weights convert one-to-one. Staged two ways:

* ``stage_split="paper"``: ("features", "head") - pooled 64-d vector, then the
  linear classifier: the paper's 2HKT inheritance point.
* ``stage_split="groups"``: ("group1", "group2", "group3", "head") - after each
  residual group (spatial features, for nHKT with softmax GA), then pool + fc.

``bn_folded=True`` is the inference-only form of a frozen network whose
BatchNorms were folded into conv biases (``hkt_jax.models.fold``): same stages, no BN.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from hkt_jax.kernels import cpu_conv

STAGE_SPLITS = {
    "paper": ("features", "head"),
    "groups": ("group1", "group2", "group3", "head"),
}
GROUP_STAGES = {"group1": 0, "group2": 1, "group3": 2}  # stage name -> residual group index
GROUP_WIDTHS = (16, 32, 64)

conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # torch kaiming_normal_


def _conv(
    features: int, kernel: int, stride: int, name: str, dtype, use_bias: bool = False, conv_impl: str = "auto"
) -> nn.Conv:
    pad = kernel // 2
    impl = cpu_conv.conv_fn(conv_impl)  # None: XLA; "auto": kernel or XLA per convolution, timed here
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        name=name,
        conv_general_dilated=impl,
    )


class FoldedConv(nn.Module):
    """3x3 conv + bias, then optionally + residual and ReLU: one pass when the CPU kernel applies.
    Parameters as ``nn.Conv(use_bias=True)`` ("kernel", "bias"), so folded checkpoints are unchanged."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, residual=None, *, relu: bool = True):
        kernel = self.param("kernel", conv_init, (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
        fused = cpu_conv.bias_act_fn(self.conv_impl)
        if fused is not None:
            return fused(x, kernel, bias, residual, stride=self.stride, relu=relu)
        return cpu_conv.conv3x3_bias_act_reference(x, kernel, bias, residual, stride=self.stride, relu=relu)


BN_EPSILON = 1e-5  # PyTorch BatchNorm2d's default (also what hkt_jax.models.fold folds with)


def _bn(name: str, dtype) -> nn.BatchNorm:
    # PyTorch BatchNorm2d defaults: momentum 0.1 (= 0.9 here), eps 1e-5.
    return nn.BatchNorm(momentum=0.9, epsilon=BN_EPSILON, dtype=dtype, name=name)


def option_a_shortcut(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
    """Parameter-free shortcut: subsample by ``stride``, zero-pad channels equally on both sides."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_channels - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    shortcut: Literal["A", "B"] = "A"
    dtype: Any = jnp.float32
    bn_folded: bool = False
    conv_impl: str = "auto"

    def setup(self):
        pairs = [("conv1", "bn1", 3, self.stride), ("conv2", "bn2", 3, 1)]
        if self.shortcut == "B":
            pairs.append(("shortcut_conv", "shortcut_bn", 1, self.stride))
        self.convs = {
            conv: FoldedConv(self.features, stride, self.dtype, self.conv_impl, name=conv)
            if self.bn_folded and k == 3
            else _conv(self.features, k, stride, conv, self.dtype, use_bias=self.bn_folded, conv_impl=self.conv_impl)
            for conv, _, k, stride in pairs
        }
        self.norms = {} if self.bn_folded else {conv: _bn(bn, self.dtype) for conv, bn, _, _ in pairs}

    def _conv_bn(self, name, x, train):
        y = self.convs[name](x)
        return y if self.bn_folded else self.norms[name](y, use_running_average=not train)

    def _residual(self, x, train):
        if self.stride == 1 and x.shape[-1] == self.features:
            return x
        if self.shortcut == "A":
            return option_a_shortcut(x, self.features, self.stride)
        return self._conv_bn("shortcut_conv", x, train)

    def __call__(self, x, *, train: bool):
        if self.bn_folded:  # inference: conv + bias (+ residual) + ReLU fused per conv
            y = self.convs["conv1"](x, relu=True)
            return self.convs["conv2"](y, self._residual(x, train), relu=True)
        y = nn.relu(self._conv_bn("conv1", x, train))
        y = self._conv_bn("conv2", y, train)
        return nn.relu(y + self._residual(x, train))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs. ``apply(v, x_nhwc, train=False)`` -> logits."""

    depth: int = 20
    num_classes: int = 10
    shortcut: Literal["A", "B"] = "A"
    stage_split: Literal["paper", "groups"] = "paper"
    dtype: Any = jnp.float32
    bn_folded: bool = False  # inference-only: BatchNorm folded into conv biases (hkt_jax.models.fold)
    conv_impl: str = "auto"  # "xla" | "cpu_kernel" | "auto" (hkt_jax.kernels.cpu_conv): same parameters either way

    def setup(self):
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"CifarResNet: `depth` must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {self.depth}"
            )
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: `shortcut` must be 'A' or 'B', got {self.shortcut!r}")
        if self.stage_split not in STAGE_SPLITS:
            raise ValueError(
                f"CifarResNet: `stage_split` must be one of {tuple(STAGE_SPLITS)}, got {self.stage_split!r}"
            )
        blocks_per_group = (self.depth - 2) // 6
        self.conv1 = (
            FoldedConv(GROUP_WIDTHS[0], 1, self.dtype, self.conv_impl, name="conv1")
            if self.bn_folded
            else _conv(GROUP_WIDTHS[0], 3, 1, "conv1", self.dtype, conv_impl=self.conv_impl)
        )
        if not self.bn_folded:
            self.bn1 = _bn("bn1", self.dtype)
        self.groups = [
            [
                BasicBlock(
                    width,
                    stride=(2 if g > 0 and b == 0 else 1),
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                    bn_folded=self.bn_folded,
                    conv_impl=self.conv_impl,
                    name=f"layer{g + 1}_{b}",
                )
                for b in range(blocks_per_group)
            ]
            for g, width in enumerate(GROUP_WIDTHS)
        ]
        self.fc = nn.Dense(self.num_classes, kernel_init=conv_init, dtype=self.dtype, name="fc")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return STAGE_SPLITS[self.stage_split]

    def _stem(self, x, train):
        if self.bn_folded:
            return self.conv1(x, relu=True)
        return nn.relu(self.bn1(self.conv1(x), use_running_average=not train))

    def _group(self, g, x, train):
        for block in self.groups[g]:
            x = block(x, train=train)
        return x

    def _head(self, x):
        return self.fc(x).astype(jnp.float32)

    def stage(self, index: int, x, *, train: bool):
        if train and self.bn_folded:
            raise ValueError(
                "CifarResNet(bn_folded=True) is inference-only (its BatchNorm is folded into the "
                "convolutions); fold only frozen networks and run them with train=False"
            )
        names = self.stage_names
        if not 0 <= index < len(names):
            raise ValueError(f"CifarResNet: stage index {index} out of range for stages {names}")
        name = names[index]
        if index == 0:  # the image, cast to the compute dtype (a no-op in float32)
            x = jnp.asarray(x, self.dtype)
        if name == "features":
            x = self._stem(x, train)
            for g in range(len(GROUP_WIDTHS)):
                x = self._group(g, x, train)
            return jnp.mean(x, axis=(1, 2))
        if name == "head":
            if self.stage_split == "groups":
                x = jnp.mean(x, axis=(1, 2))
            return self._head(x)
        g = GROUP_STAGES[name]
        if g == 0:
            x = self._stem(x, train)
        return self._group(g, x, train)

    def __call__(self, x, train: bool = False):
        for index in range(len(self.stage_names)):
            x = self.stage(index, x, train=train)
        return x
