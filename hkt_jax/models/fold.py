"""Fold a frozen network's BatchNorm into its convolutions: an equivalent BN-free network.

The HKT parent always runs in inference mode, where BatchNorm is a per-channel
affine map with constant coefficients,

    BN(conv(x, W)) = (conv(x, W) - mean) * s + beta,     s = gamma / sqrt(var + eps)
                   = conv(x, W * s) + (beta - mean * s),

so each conv+BN pair becomes one conv with a bias. ``fold_parent`` does this
as a pure function of the variables and returns the same staged model with
``bn_folded=True`` (same stages, stage outputs up to float rounding, and
parameter names), so the HKT
engine can use it in place of the original parent. Gradients still flow
*through* the folded network (head inheritance needs that); only its
parameters are frozen, as before.

Folding rules are registered per architecture (``FOLD_RULES``); today
``CifarResNet`` (option-A and option-B shortcuts, either stage split). Other
models are returned unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from hkt_jax.models.cifar_resnet import BN_EPSILON, CifarResNet


def fold_conv_bn(kernel, bn_params, bn_stats, epsilon: float = BN_EPSILON) -> dict[str, np.ndarray]:
    """(conv kernel HWIO, BN {scale, bias}, BN {mean, var}) -> folded {kernel, bias}, in float64 then cast."""
    dtype = np.asarray(kernel).dtype
    s = np.asarray(bn_params["scale"], np.float64) / np.sqrt(np.asarray(bn_stats["var"], np.float64) + epsilon)
    folded_kernel = np.asarray(kernel, np.float64) * s  # scales the output-channel (last) axis
    bias = np.asarray(bn_params["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * s
    return {"kernel": folded_kernel.astype(dtype), "bias": bias.astype(dtype)}


_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("shortcut_conv", "shortcut_bn"))


def fold_cifar_resnet(variables: Any) -> dict[str, Any]:
    """``CifarResNet`` variables -> ``CifarResNet(bn_folded=True)`` variables (params only)."""
    params, stats = jax.device_get(variables["params"]), jax.device_get(variables["batch_stats"])
    folded: dict[str, Any] = {
        "conv1": fold_conv_bn(params["conv1"]["kernel"], params["bn1"], stats["bn1"]),
        "fc": {k: np.asarray(v) for k, v in params["fc"].items()},
    }
    for name, block in params.items():
        if not name.startswith("layer"):
            continue
        folded[name] = {
            conv: fold_conv_bn(block[conv]["kernel"], block[bn], stats[name][bn])
            for conv, bn in _PAIRS
            if conv in block
        }
    return {"params": folded}


def _fold_cifar_resnet_model(model: CifarResNet, variables: Any) -> tuple[nn.Module, Any] | None:
    if model.bn_folded or not variables.get("batch_stats"):
        return None
    return model.clone(bn_folded=True), fold_cifar_resnet(variables)


# Model class -> rule returning the folded (module, variables), or None when there is nothing to fold.
FOLD_RULES = {CifarResNet: _fold_cifar_resnet_model}


def fold_parent(parent: nn.Module, variables: Any) -> tuple[nn.Module, Any]:
    """An equivalent BN-free (module, variables) for a frozen network in inference mode,
    or the pair unchanged when this model type has no folding rule."""
    rule = FOLD_RULES.get(type(parent))
    folded = rule(parent, variables) if rule is not None else None
    return folded if folded is not None else (parent, variables)
