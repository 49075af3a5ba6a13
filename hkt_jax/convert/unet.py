"""PyTorch U-Net weights <-> Flax ``UNet`` / ``PocketNet`` variables.

PyTorch module names follow milesial/Pytorch-UNet with ``bilinear=False``
(``inc``, ``down1..downL`` - the last one is the bottleneck -, ``up1..upL``
counted from the bottom, ``outc``; ``DoubleConv.double_conv`` = Conv, BN,
ReLU, Conv, BN, ReLU), generalised to any depth and widths. Convolutions
before a BatchNorm carry no bias. ``module_names(depth)`` is the explicit
name table for one depth; ``PARAM_RULES`` says how each kind of layer
renames and transposes its tensors. The Flax model's own variable tree
(``jax.eval_shape`` of its ``init``) is the authority: every missing key,
unexpected key and shape mismatch is listed in one ``ValueError``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hkt_jax.convert.resnet import (
    BATCHNORM,
    CONV,
    PARAM_RULES as RESNET_PARAM_RULES,
    TORCH_ONLY_BUFFERS,
    ParamRule,
    _as_float32_numpy,
    _raise_if_problems,
    _unwrap_state_dict,
    load_torch_checkpoint,
    require_torch,
)
from hkt_jax.models.unet import StagedUNet

CONV_BIAS, CONV_TRANSPOSE = "conv_bias", "conv_transpose"

PARAM_RULES = {
    CONV: RESNET_PARAM_RULES[CONV],  # weight OIHW -> kernel HWIO
    BATCHNORM: RESNET_PARAM_RULES[BATCHNORM],
    CONV_BIAS: (
        ParamRule("weight", "params", "kernel", (2, 3, 1, 0)),
        ParamRule("bias", "params", "bias", None),
    ),
    # torch ConvTranspose2d weight (in, out, kh, kw) -> flax ConvTranspose(transpose_kernel=True) (kh, kw, out, in)
    CONV_TRANSPOSE: (
        ParamRule("weight", "params", "kernel", (2, 3, 1, 0)),
        ParamRule("bias", "params", "bias", None),
    ),
}

# Inside one DoubleConv: (PyTorch suffix, Flax submodule, kind). Indices 2 and 5 are the ReLUs.
DOUBLE_CONV_ROWS = (
    ("double_conv.0", "conv1", CONV),
    ("double_conv.1", "bn1", BATCHNORM),
    ("double_conv.3", "conv2", CONV),
    ("double_conv.4", "bn2", BATCHNORM),
)
STATE_DICT_PREFIX = "module."
_DOWN = re.compile(r"^(?:module\.)?down(\d+)\.")


def module_names(depth: int) -> tuple[tuple[str, str, str], ...]:
    """(PyTorch module, Flax module path, kind) for every layer of a depth-``depth`` U-Net, in torch order."""
    blocks = [("inc", "encoder_0")]
    blocks += [(f"down{k}.maxpool_conv.1", f"encoder_{k}") for k in range(1, depth)]
    blocks += [(f"down{depth}.maxpool_conv.1", "bottleneck")]
    rows = [(f"{t}.{ts}", f"{f}/{fs}", kind) for t, f in blocks for ts, fs, kind in DOUBLE_CONV_ROWS]
    for k in range(1, depth + 1):  # up1 is the deepest decoder level
        level = depth - k
        rows.append((f"up{k}.up", f"up_{level}", CONV_TRANSPOSE))
        rows += [(f"up{k}.conv.{ts}", f"decoder_{level}/{fs}", kind) for ts, fs, kind in DOUBLE_CONV_ROWS]
    rows.append(("outc.conv", "head", CONV_BIAS))
    return tuple(rows)


def _describe(model: StagedUNet) -> str:
    return (
        f"{type(model).__name__}(levels {model.level_widths}, bottleneck {model.bottleneck_width}, "
        f"in_channels {model.in_channels}, num_classes {model.num_classes})"
    )


def _expected_shapes(model: StagedUNet) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = 2 ** len(model.level_widths)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)))
    return {key: tuple(leaf.shape) for key, leaf in traverse_util.flatten_dict(shapes).items()}


def _torch_shape(flax_shape: tuple[int, ...], rule: ParamRule) -> tuple[int, ...]:
    if rule.torch_to_flax_axes is None:
        return tuple(flax_shape)
    return tuple(flax_shape[axis] for axis in np.argsort(rule.torch_to_flax_axes))


def _key_table(model: StagedUNet) -> "OrderedDict[str, tuple[tuple[str, ...], ParamRule]]":
    """Every PyTorch key (torch order) -> (Flax key, rule); buffers PyTorch alone keeps map to None."""
    table = OrderedDict()
    for torch_module, flax_module, kind in module_names(len(model.level_widths)):
        for rule in PARAM_RULES[kind]:
            flax_key = (rule.collection, *flax_module.split("/"), rule.flax_name)
            table[f"{torch_module}.{rule.torch_name}"] = (flax_key, rule)
        for buffer in TORCH_ONLY_BUFFERS.get(kind, ()):
            table[f"{torch_module}.{buffer}"] = None
    return table


def unet_from_torch(state_dict_or_path: Mapping[str, Any] | str | os.PathLike, model: StagedUNet) -> dict[str, dict]:
    """PyTorch U-Net state dict (or file) -> ``{"params", "batch_stats"}`` for ``model``."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = load_torch_checkpoint(state_dict_or_path)
    state_dict = _unwrap_state_dict(state_dict_or_path)
    expected = _expected_shapes(model)
    table = _key_table(model)
    named = {entry[0] for entry in table.values() if entry}
    unknown_to_table = sorted("/".join(k) for k in expected if k not in named)
    if unknown_to_table:  # the model grew a layer the tables do not name
        raise LookupError(f"convert.unet tables have no PyTorch name for Flax variables {unknown_to_table}")

    flat, unexpected, mismatched = {}, [], []
    for source_key, value in state_dict.items():
        key = source_key.removeprefix(STATE_DICT_PREFIX)
        if key not in table:
            unexpected.append(f"{source_key} {tuple(value.shape)}")
            continue
        if table[key] is None:
            continue
        flax_key, rule = table[key]
        wanted = _torch_shape(expected[flax_key], rule)
        if tuple(value.shape) != wanted:
            mismatched.append(
                f"{source_key}: checkpoint {tuple(value.shape)}, model expects {wanted} "
                f"(-> {'/'.join(flax_key)} {expected[flax_key]})"
            )
            flat[flax_key] = None  # present, so not also reported as missing
            continue
        array = _as_float32_numpy(value)
        if rule.torch_to_flax_axes:
            array = np.ascontiguousarray(array.transpose(rule.torch_to_flax_axes))
        flat[flax_key] = array
    missing = [
        f"{torch_key} (-> {'/'.join(entry[0])} {expected[entry[0]]})"
        for torch_key, entry in table.items()
        if entry is not None and entry[0] not in flat
    ]
    depth = len(model.level_widths)
    found_depth = max((int(m.group(1)) for m in map(_DOWN.match, state_dict) if m), default=0)
    notes = (
        [f"checkpoint has depth {found_depth} (down1..down{found_depth}), the model {depth}"]
        if found_depth != depth
        else []
    )
    _raise_if_problems(_describe(model), notes, missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(flat)


def unet_to_torch(variables: Mapping[str, Any], model: StagedUNet) -> "OrderedDict[str, Any]":
    """Flax variables of ``model`` -> PyTorch state dict in the layout above (``strict=True`` loads)."""
    torch = require_torch()
    expected = _expected_shapes(model)
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
    unexpected = [f"{'/'.join(k)} {tuple(np.shape(v))}" for k, v in flat.items() if k not in expected]
    missing = [f"{'/'.join(k)} {shape}" for k, shape in expected.items() if k not in flat]
    mismatched = [
        f"{'/'.join(k)}: variables {tuple(np.shape(flat[k]))}, model expects {shape}"
        for k, shape in expected.items()
        if k in flat and tuple(np.shape(flat[k])) != shape
    ]
    _raise_if_problems(_describe(model), [], missing, unexpected, mismatched)
    state_dict = OrderedDict()
    for torch_key, entry in _key_table(model).items():
        if entry is None:
            state_dict[torch_key] = torch.zeros((), dtype=torch.long)
            continue
        flax_key, rule = entry
        array = np.asarray(flat[flax_key], dtype=np.float32)
        if rule.torch_to_flax_axes:
            array = array.transpose(np.argsort(rule.torch_to_flax_axes))
        state_dict[torch_key] = torch.from_numpy(np.array(array, order="C", copy=True))
    return state_dict
