"""PyTorch RAFT / RAFT-small weights <-> Flax ``RAFT`` variables.

Two PyTorch layouts of the same network, both read; the size is detected:

* princeton-vl/RAFT (``raft-things.pth``, ``raft-small.pth``, ...): keys ``module.fnet.*``
  (saved from ``nn.DataParallel``). Its large context net registers each strided
  block's shortcut BatchNorm twice, as ``layerX.0.norm3`` and ``layerX.0.downsample.1``
  (one module): both are accepted and must agree.
* torchvision (``raft_large()`` / ``raft_small()`` state dicts): ``feature_encoder.*``.

``MODULE_NAMES`` pairs every Flax module with its name in each layout and
``PARAM_RULES`` says how a kind of layer renames and transposes its tensors. The
Flax model's own variable tree (``jax.eval_shape`` of ``RAFT.init``) is the
authority; every missing, unexpected or mis-shaped key is reported in one
``ValueError``. Exports are in torchvision's layout (``raft_to_torch``).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hkt_jax.convert.resnet import ParamRule, cifar_resnet_depth, load_torch_checkpoint, require_torch
from hkt_jax.models.raft import RAFT

CONV, BATCHNORM = "conv", "batchnorm"
PRINCETON, TORCHVISION = "princeton-vl", "torchvision"
DATA_PARALLEL_PREFIX = "module."
STATE_DICT_WRAPPERS = ("state_dict", "model", "net")


PARAM_RULES = {
    CONV: (
        ParamRule("weight", "params", "kernel", (2, 3, 1, 0)),  # OIHW -> HWIO
        ParamRule("bias", "params", "bias", None),
    ),
    BATCHNORM: (
        ParamRule("weight", "params", "scale", None),
        ParamRule("bias", "params", "bias", None),
        ParamRule("running_mean", "batch_stats", "mean", None),
        ParamRule("running_var", "batch_stats", "var", None),
    ),
}
# PyTorch bookkeeping with no Flax counterpart: dropped on import, written as zeros on export.
TORCH_ONLY_BUFFERS = {BATCHNORM: ("num_batches_tracked",)}


class ModuleName(NamedTuple):
    flax: str  # module path in the Flax tree, "/"-separated
    princeton: str
    torchvision: str
    kind: str


def _encoder_names(flax: str, princeton: str, torchvision: str, small: bool, batch_norm: bool):
    rows = [ModuleName(f"{flax}/conv1", f"{princeton}.conv1", f"{torchvision}.convnormrelu.0", CONV)]
    if batch_norm:
        rows.append(ModuleName(f"{flax}/norm1", f"{princeton}.norm1", f"{torchvision}.convnormrelu.1", BATCHNORM))
    for stage in (1, 2, 3):
        for block in (0, 1):
            f, p, t = (
                f"{flax}/layer{stage}_{block}",
                f"{princeton}.layer{stage}.{block}",
                f"{torchvision}.layer{stage}.{block}",
            )
            for i in (1, 2, 3) if small else (1, 2):
                rows.append(ModuleName(f"{f}/conv{i}", f"{p}.conv{i}", f"{t}.convnormrelu{i}.0", CONV))
                if batch_norm:
                    rows.append(ModuleName(f"{f}/norm{i}", f"{p}.norm{i}", f"{t}.convnormrelu{i}.1", BATCHNORM))
            if stage > 1 and block == 0:  # strided: 1x1 projection (+ norm) on the shortcut
                rows.append(ModuleName(f"{f}/downsample", f"{p}.downsample.0", f"{t}.downsample.0", CONV))
                if batch_norm:
                    rows.append(ModuleName(f"{f}/norm3", f"{p}.downsample.1", f"{t}.downsample.1", BATCHNORM))
    rows.append(ModuleName(f"{flax}/conv2", f"{princeton}.conv2", f"{torchvision}.conv", CONV))
    return rows


def module_names(small: bool) -> tuple[ModuleName, ...]:
    """Every parametrised module of ``RAFT(small)`` with its princeton-vl and torchvision names."""
    rows = _encoder_names("fnet", "fnet", "feature_encoder", small, batch_norm=False)
    rows += _encoder_names("cnet", "cnet", "context_encoder", small, batch_norm=not small)
    update, motion = ("update_block", "update_block.encoder"), "update_block.motion_encoder"
    convs = [("convc1", "convcorr1.0")] + ([] if small else [("convc2", "convcorr2.0")])
    convs += [("convf1", "convflow1.0"), ("convf2", "convflow2.0"), ("conv", "conv.0")]
    rows += [ModuleName(f"update_block/encoder/{f}", f"{update[1]}.{f}", f"{motion}.{t}", CONV) for f, t in convs]
    gru = [("", "convgru1")] if small else [("1", "convgru1"), ("2", "convgru2")]
    rows += [
        ModuleName(
            f"update_block/gru/conv{gate}{suffix}",
            f"update_block.gru.conv{gate}{suffix}",
            f"update_block.recurrent_block.{tv}.conv{gate}",
            CONV,
        )
        for suffix, tv in gru
        for gate in "zrq"
    ]
    rows += [
        ModuleName(
            f"update_block/flow_head/conv{i}",
            f"update_block.flow_head.conv{i}",
            f"update_block.flow_head.conv{i}",
            CONV,
        )
        for i in (1, 2)
    ]
    if not small:
        rows += [
            ModuleName("update_block/mask/conv1", "update_block.mask.0", "mask_predictor.convrelu.0", CONV),
            ModuleName("update_block/mask/conv2", "update_block.mask.2", "mask_predictor.conv", CONV),
        ]
    return tuple(rows)


def princeton_aliases(small: bool) -> dict[str, str]:
    """princeton-vl's second name for a module -> the name the table uses (``norm3`` is ``downsample.1``)."""
    if small:
        return {}
    return {f"cnet.layer{stage}.0.norm3": f"cnet.layer{stage}.0.downsample.1" for stage in (2, 3)}


@functools.lru_cache(maxsize=2)
def flax_shapes(small: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(collection, *module path, leaf): shape} of ``RAFT(small)``, from tracing its init (no compute)."""
    frames = jnp.zeros((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(RAFT(small=small).init, iters=1), jax.random.key(0), frames, frames)
    return {key: tuple(leaf.shape) for key, leaf in traverse_util.flatten_dict(shapes).items()}


def _torch_shape(flax_shape: tuple[int, ...], rule: ParamRule) -> tuple[int, ...]:
    if rule.torch_to_flax_axes is None:
        return tuple(flax_shape)
    return tuple(flax_shape[axis] for axis in np.argsort(rule.torch_to_flax_axes))


def param_table(small: bool, layout: str) -> list[tuple[str, tuple[str, ...], ParamRule, tuple[int, ...]]]:
    """(torch key, Flax key, rule, Flax shape) for every variable of ``RAFT(small)``, in state-dict order."""
    shapes = flax_shapes(small)
    table = []
    for row in module_names(small):
        torch_module = row.princeton if layout == PRINCETON else row.torchvision
        for rule in PARAM_RULES[row.kind]:
            flax_key = (rule.collection, *row.flax.split("/"), rule.flax_name)
            table.append((f"{torch_module}.{rule.torch_name}", flax_key, rule, shapes[flax_key]))
    covered = {flax_key for _, flax_key, _, _ in table}
    if covered != set(shapes):  # the table and the model disagree: a bug here, not in the checkpoint
        raise AssertionError(f"RAFT name table out of date: {sorted(set(shapes) ^ covered)}")
    return table


def _model_name(small: bool) -> str:
    return "RAFT(small=True) (RAFT-S)" if small else "RAFT(small=False) (RAFT large)"


def _unwrap(checkpoint: Any) -> dict[str, Any]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"not a RAFT state dict: got a {type(checkpoint).__name__}")
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_arrays = sorted(str(key) for key, value in checkpoint.items() if not hasattr(value, "shape"))
    if not_arrays:
        raise ValueError(f"not a state dict: entries {not_arrays[:10]} are not tensors")
    keys = list(checkpoint)
    if keys and all(key.startswith(DATA_PARALLEL_PREFIX) for key in keys):
        return {key[len(DATA_PARALLEL_PREFIX) :]: value for key, value in checkpoint.items()}
    return dict(checkpoint)


def detect_layout(state_dict: Mapping[str, Any]) -> tuple[str, bool]:
    """(layout, small) from the feature net's stem conv (64 output channels: large, 32: small).

    Anything else is a ``ValueError``; a CIFAR ResNet is named as one, with its depth.
    """
    for layout, stem in ((PRINCETON, "fnet.conv1.weight"), (TORCHVISION, "feature_encoder.convnormrelu.0.weight")):
        if stem in state_dict:
            channels = tuple(state_dict[stem].shape)[0]
            if channels not in (32, 64):
                raise ValueError(f"{stem} has {channels} output channels: neither RAFT (64) nor RAFT-S (32)")
            return layout, channels == 32
    depth = cifar_resnet_depth(state_dict)
    if depth is not None:
        raise ValueError(
            f"not a RAFT checkpoint: it holds a CIFAR ResNet of depth {depth} (detected from its keys); "
            f"convert it with resnet_from_torch(..., depth={depth}) or `python -m hkt_jax.convert "
            f"resnet --src FILE --depth {depth} --out DIR`"
        )
    sample = ", ".join(list(state_dict)[:6])
    raise ValueError(
        f"not a RAFT checkpoint: no feature-encoder stem (princeton-vl 'fnet.conv1.weight' or torchvision "
        f"'feature_encoder.convnormrelu.0.weight') among its {len(state_dict)} keys (first: {sample})"
    )


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU (``resnet.load_torch_checkpoint``): a missing file is a
    ``FileNotFoundError``, a directory or a file torch cannot read that way a ``ValueError`` naming it."""
    return load_torch_checkpoint(path)


def checkpoint_layout(checkpoint: Mapping[str, Any]) -> tuple[str, bool]:
    """(layout, small) of a loaded PyTorch RAFT checkpoint, without converting it."""
    return detect_layout(_unwrap(checkpoint))


def _as_float32_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; .float() also covers fp16/bf16
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32, copy=True)


def _raise_if_problems(target: str, notes, missing, unexpected, mismatched) -> None:
    if not (notes or missing or unexpected or mismatched):
        return
    lines = [f"cannot convert: checkpoint does not match {target}"] + [f"  {note}" for note in notes]
    for title, items in (
        ("missing keys (the model needs them, the checkpoint lacks them)", missing),
        ("unexpected keys (in the checkpoint, no place in the model)", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines += [f"  {len(items)} {title}:"] + [f"    {item}" for item in items]
    raise ValueError("\n".join(lines))


def raft_from_torch(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike, small: bool | None = None
) -> dict[str, Any]:
    """A princeton-vl or torchvision RAFT checkpoint -> ``{"params", "batch_stats"}`` for ``RAFT(small)``.

    ``small=None`` takes the size the checkpoint has; a given size must match it (the
    error then lists every key that does not fit). ``batch_stats`` is empty for RAFT-S.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = load_checkpoint(state_dict_or_path)
    state_dict = _unwrap(state_dict_or_path)
    layout, detected_small = detect_layout(state_dict)
    small = detected_small if small is None else small
    notes = []
    if small != detected_small:
        notes.append(
            f"the checkpoint is {_model_name(detected_small)} ({layout} layout), asked for {_model_name(small)}"
        )

    remaining = dict(state_dict)
    missing, mismatched, alias_problems = [], [], []
    if layout == PRINCETON:
        for alias, name in princeton_aliases(small).items():
            for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if f"{alias}.{suffix}" in remaining and f"{name}.{suffix}" in remaining:
                    twin = remaining.pop(f"{alias}.{suffix}")
                    if not np.array_equal(_as_float32_numpy(twin), _as_float32_numpy(remaining[f"{name}.{suffix}"])):
                        alias_problems.append(
                            f"{alias}.{suffix} differs from {name}.{suffix} (the same module "
                            "in princeton-vl's RAFT: the checkpoint is inconsistent)"
                        )
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for torch_key, flax_key, rule, flax_shape in param_table(small, layout):
        if torch_key not in remaining:
            missing.append(f"{torch_key} {_torch_shape(flax_shape, rule)}")
            continue
        value = _as_float32_numpy(remaining.pop(torch_key))
        expected = _torch_shape(flax_shape, rule)
        if value.shape != expected:
            mismatched.append(f"{torch_key}: checkpoint {tuple(value.shape)}, model {expected}")
            continue
        flat[flax_key] = value if rule.torch_to_flax_axes is None else np.transpose(value, rule.torch_to_flax_axes)
    bookkeeping = {
        f"{row.princeton if layout == PRINCETON else row.torchvision}.{buffer}"
        for row in module_names(small)
        for buffer in TORCH_ONLY_BUFFERS.get(row.kind, ())
    }
    unexpected = sorted(f"{key} {tuple(value.shape)}" for key, value in remaining.items() if key not in bookkeeping)
    _raise_if_problems(
        f"{_model_name(small)} ({layout} layout)", notes + alias_problems, missing, unexpected, mismatched
    )
    variables = traverse_util.unflatten_dict(flat)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def raft_size(variables: Mapping[str, Any]) -> bool:
    """``small`` of the RAFT these variables belong to (feature stem: 64 channels large, 32 small)."""
    return int(np.shape(variables["params"]["fnet"]["conv1"]["kernel"])[-1]) == 32


def raft_to_torch(variables: Mapping[str, Any], small: bool | None = None) -> "OrderedDict[str, Any]":
    """Flax RAFT variables -> a torchvision-layout state dict (``raft_large()`` / ``raft_small()``, strict)."""
    torch = require_torch()
    small = raft_size(variables) if small is None else small
    flat = traverse_util.flatten_dict({key: dict(value) for key, value in variables.items()})
    state_dict: OrderedDict[str, Any] = OrderedDict()
    missing, mismatched = [], []
    for torch_key, flax_key, rule, flax_shape in param_table(small, TORCHVISION):
        if flax_key not in flat:
            missing.append("/".join(flax_key))
            continue
        value = np.asarray(flat.pop(flax_key), np.float32)
        if value.shape != flax_shape:
            mismatched.append(f"{'/'.join(flax_key)}: variables {value.shape}, {_model_name(small)} {flax_shape}")
            continue
        if rule.torch_to_flax_axes is not None:
            value = np.transpose(value, np.argsort(rule.torch_to_flax_axes))
        state_dict[torch_key] = torch.from_numpy(np.ascontiguousarray(value))
        if rule.torch_name == "running_var":
            state_dict[torch_key.replace("running_var", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    unexpected = sorted("/".join(key) for key in flat)
    _raise_if_problems(f"{_model_name(small)}", [], missing, unexpected, mismatched)
    return state_dict
