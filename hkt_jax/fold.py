"""Fold a frozen network's BatchNorm into its convolutions: an equivalent BN-free network.

The HKT parent always runs in inference mode, where BatchNorm is a per-channel
affine map with constant coefficients,

    BN(conv(x, W)) = (conv(x, W) - mean) * s + beta,     s = gamma / sqrt(var + eps)
                   = conv(x, W * s) + (beta - mean * s),

so each conv+BN pair becomes one conv with a bias. ``fold_parent`` does this
as a pure function of the variables and returns a staged module with the same
stages, stage outputs (up to float rounding) and parameter names, so the HKT
engine can use it in place of the original parent. Gradients still flow
*through* the folded network (head inheritance needs that); only its
parameters are frozen, as before.

Supported: ``CifarResNet`` (option-A and option-B shortcuts, either stage
split). Other models are returned unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.models.cifar_resnet import GROUP_WIDTHS, STAGE_SPLITS, CifarResNet, option_a_shortcut

BN_EPSILON = 1e-5  # hkt_jax.models.cifar_resnet._bn


def _conv(features: int, kernel: int, stride: int, name: str, dtype) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=True, dtype=dtype, name=name)


class FoldedBasicBlock(nn.Module):
    features: int
    stride: int = 1
    shortcut: Literal["A", "B"] = "A"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.relu(_conv(self.features, 3, self.stride, "conv1", self.dtype)(x))
        y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            residual = x
        elif self.shortcut == "A":
            residual = option_a_shortcut(x, self.features, self.stride)
        else:
            residual = _conv(self.features, 1, self.stride, "shortcut_conv", self.dtype)(x)
        return nn.relu(y + residual)


class FoldedCifarResNet(nn.Module):
    """``CifarResNet`` in inference mode with every BatchNorm folded into the conv before it.

    Same ``stage_names`` and ``stage(index, x, train=False)`` contract; ``train=True``
    is an error (there are no batch statistics left to use).
    """

    depth: int = 20
    num_classes: int = 10
    shortcut: Literal["A", "B"] = "A"
    stage_split: Literal["paper", "groups"] = "paper"
    dtype: Any = jnp.float32

    def setup(self):
        blocks_per_group = (self.depth - 2) // 6
        self.conv1 = _conv(GROUP_WIDTHS[0], 3, 1, "conv1", self.dtype)
        self.groups = [
            [FoldedBasicBlock(width, stride=(2 if g > 0 and b == 0 else 1), shortcut=self.shortcut,
                              dtype=self.dtype, name=f"layer{g + 1}_{b}") for b in range(blocks_per_group)]
            for g, width in enumerate(GROUP_WIDTHS)
        ]
        self.fc = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return STAGE_SPLITS[self.stage_split]

    def _group(self, g, x):
        if g == 0:
            x = nn.relu(self.conv1(x))
        for block in self.groups[g]:
            x = block(x)
        return x

    def stage(self, index: int, x, *, train: bool = False):
        if train:
            raise ValueError("FoldedCifarResNet is an inference-only network (BatchNorm is folded); train=True "
                             "makes no sense for it - fold only frozen networks")
        names = self.stage_names
        if not 0 <= index < len(names):
            raise ValueError(f"FoldedCifarResNet: stage index {index} out of range for stages {names}")
        name = names[index]
        if name == "features":
            for g in range(len(GROUP_WIDTHS)):
                x = self._group(g, x)
            return jnp.mean(x, axis=(1, 2))
        if name == "head":
            if self.stage_split == "groups":
                x = jnp.mean(x, axis=(1, 2))
            return self.fc(x).astype(jnp.float32)
        return self._group(int(name[-1]) - 1, x)

    def __call__(self, x, train: bool = False):
        for index in range(len(self.stage_names)):
            x = self.stage(index, x, train=train)
        return x


def fold_conv_bn(kernel, bn_params, bn_stats, epsilon: float = BN_EPSILON) -> dict[str, np.ndarray]:
    """(conv kernel HWIO, BN {scale, bias}, BN {mean, var}) -> folded {kernel, bias}, in float64 then cast."""
    dtype = np.asarray(kernel).dtype
    s = np.asarray(bn_params["scale"], np.float64) / np.sqrt(np.asarray(bn_stats["var"], np.float64) + epsilon)
    folded_kernel = np.asarray(kernel, np.float64) * s  # scales the output-channel (last) axis
    bias = np.asarray(bn_params["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * s
    return {"kernel": folded_kernel.astype(dtype), "bias": bias.astype(dtype)}


_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("shortcut_conv", "shortcut_bn"))


def fold_cifar_resnet(variables: Any) -> dict[str, Any]:
    """``CifarResNet`` variables -> ``FoldedCifarResNet`` variables (params only)."""
    params, stats = jax.device_get(variables["params"]), jax.device_get(variables["batch_stats"])
    folded: dict[str, Any] = {"conv1": fold_conv_bn(params["conv1"]["kernel"], params["bn1"], stats["bn1"]),
                              "fc": {k: np.asarray(v) for k, v in params["fc"].items()}}
    for name, block in params.items():
        if not name.startswith("layer"):
            continue
        folded[name] = {conv: fold_conv_bn(block[conv]["kernel"], block[bn], stats[name][bn])
                        for conv, bn in _PAIRS if conv in block}
    return {"params": folded}


def fold_parent(parent: nn.Module, variables: Any) -> tuple[nn.Module, Any]:
    """An equivalent BN-free (module, variables) for a frozen network in inference mode,
    or the pair unchanged when this model type has no folding rule."""
    if isinstance(parent, CifarResNet) and variables.get("batch_stats"):
        folded = FoldedCifarResNet(depth=parent.depth, num_classes=parent.num_classes, shortcut=parent.shortcut,
                                   stage_split=parent.stage_split, dtype=parent.dtype)
        return folded, fold_cifar_resnet(variables)
    return parent, variables
