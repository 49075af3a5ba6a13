"""PyTorch CIFAR ResNet weights <-> Flax ``CifarResNet`` variables.

Table-driven, in the style of the scenic / jax-raft converters: ``MODULE_NAMES``
pairs every PyTorch module with its Flax module, ``PARAM_RULES`` says how each
kind of layer renames and transposes its tensors. The Flax model's own variable
tree (``jax.eval_shape`` of ``CifarResNet.init``) is the authority: every key the
two sides disagree on is collected and reported in one ``ValueError`` - a partial
load would silently train or evaluate a different network.

PyTorch layouts handled: akamaster/pytorch_resnet_cifar10 (option A, ``linear``,
``{'state_dict': ...}`` with ``module.`` prefixes) and the option-B variant the
distillation repos save (``shortcut.0``/``shortcut.1`` or ``downsample.0``/
``downsample.1``, ``fc``, ``{'model': ...}`` / ``{'net': ...}``). torch is only
imported when a file is read or tensors are written.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from hkt_jax.models.cifar_resnet import GROUP_WIDTHS, CifarResNet
from hkt_jax.training.checkpoint import MODEL_SPEC_FILE

CONV, BATCHNORM, LINEAR = "conv", "batchnorm", "linear"

# (PyTorch module, Flax module path, kind). {g}: residual group 1..3, {b}: block in the group.
# Row order is the PyTorch state-dict order within a block, so exports come out in that order.
MODULE_NAMES = (
    ("conv1", "conv1", CONV),
    ("bn1", "bn1", BATCHNORM),
    ("layer{g}.{b}.conv1", "layer{g}_{b}/conv1", CONV),
    ("layer{g}.{b}.bn1", "layer{g}_{b}/bn1", BATCHNORM),
    ("layer{g}.{b}.conv2", "layer{g}_{b}/conv2", CONV),
    ("layer{g}.{b}.bn2", "layer{g}_{b}/bn2", BATCHNORM),
    ("layer{g}.{b}.shortcut.0", "layer{g}_{b}/shortcut_conv", CONV),
    ("layer{g}.{b}.shortcut.1", "layer{g}_{b}/shortcut_bn", BATCHNORM),
    ("linear", "fc", LINEAR),
)

# Other repositories' names for the same modules, rewritten to the canonical names above on import.
TORCH_ALIASES = (
    (re.compile(r"^fc\."), "linear."),
    (re.compile(r"\.downsample\.(?=[01]\.)"), ".shortcut."),
)

# Training wrappers whose value is the state dict ({'state_dict': ...} akamaster, {'model': ...} RepDistiller, ...).
STATE_DICT_WRAPPERS = ("state_dict", "model", "net")
DATA_PARALLEL_PREFIX = "module."


class ParamRule(NamedTuple):
    torch_name: str
    collection: str
    flax_name: str
    torch_to_flax_axes: tuple[int, ...] | None  # np.transpose axes; None: same layout


PARAM_RULES = {
    CONV: (ParamRule("weight", "params", "kernel", (2, 3, 1, 0)),),  # OIHW -> HWIO
    BATCHNORM: (
        ParamRule("weight", "params", "scale", None),
        ParamRule("bias", "params", "bias", None),
        ParamRule("running_mean", "batch_stats", "mean", None),
        ParamRule("running_var", "batch_stats", "var", None),
    ),
    LINEAR: (
        ParamRule("weight", "params", "kernel", (1, 0)),  # (out, in) -> (in, out)
        ParamRule("bias", "params", "bias", None),
    ),
}
# PyTorch bookkeeping with no Flax counterpart: dropped on import, written as zeros on export.
TORCH_ONLY_BUFFERS = {BATCHNORM: ("num_batches_tracked",)}

_TORCH_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.")  # prefix of a torch key inside residual block (g, b)
_FLAX_BLOCK = re.compile(r"layer(\d+)_(\d+)$")  # a Flax block module


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{g\}", r"(?P<g>\d+)").replace(r"\{b\}", r"(?P<b>\d+)"))


_TORCH_MODULE_REGEXES = tuple(_template_regex(torch_module) for torch_module, _, _ in MODULE_NAMES)
_FLAX_MODULE_REGEXES = tuple(_template_regex(flax_module) for _, flax_module, _ in MODULE_NAMES)


class _ModuleMatch(NamedTuple):
    row: int
    torch_module: str
    flax_module: str
    kind: str
    fields: dict[str, str]


def _match_module(name: str, regexes: tuple[re.Pattern, ...]) -> _ModuleMatch | None:
    for row, regex in enumerate(regexes):
        match = regex.fullmatch(name)
        if match:
            torch_template, flax_template, kind = MODULE_NAMES[row]
            fields = match.groupdict()
            return _ModuleMatch(row, torch_template.format(**fields), flax_template.format(**fields), kind, fields)
    return None


def _torch_shape(flax_shape: tuple[int, ...], rule: ParamRule) -> tuple[int, ...]:
    """The PyTorch-layout shape of a Flax array (for messages and export)."""
    if rule.torch_to_flax_axes is None:
        return tuple(flax_shape)
    return tuple(flax_shape[axis] for axis in np.argsort(rule.torch_to_flax_axes))


def _model_module(flax_module: str) -> _ModuleMatch:
    """Table row of a module ``CifarResNet`` creates; a miss means the tables are behind the model."""
    module = _match_module(flax_module, _FLAX_MODULE_REGEXES)
    if module is None:
        raise LookupError(
            f"MODULE_NAMES has no PyTorch name for Flax module {flax_module!r}: "
            "CifarResNet grew a layer the converter tables do not know"
        )
    return module


def _torch_key_for(flax_key: tuple[str, ...]) -> tuple[str, ParamRule]:
    """Flax key (collection, *module path, leaf) of a model variable -> canonical PyTorch key and its rule."""
    collection, *module_path, leaf = flax_key
    module = _model_module("/".join(module_path))
    for rule in PARAM_RULES[module.kind]:
        if (rule.collection, rule.flax_name) == (collection, leaf):
            return f"{module.torch_module}.{rule.torch_name}", rule
    raise LookupError(f"PARAM_RULES[{module.kind!r}] has no PyTorch name for {'/'.join(flax_key)}")


@functools.lru_cache(maxsize=None)
def _expected_shapes(depth: int, num_classes: int, shortcut: str) -> tuple[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(Flax key, shape) for every variable ``CifarResNet`` creates; traced, never materialised.

    A tuple, not a dict, so the lru_cache entry cannot be mutated by a caller.
    """
    model = CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return tuple((key, tuple(leaf.shape)) for key, leaf in traverse_util.flatten_dict(shapes).items())


def _model_name(depth: int, num_classes: int, shortcut: str) -> str:
    return f"CifarResNet(depth={depth}, num_classes={num_classes}, shortcut={shortcut!r})"


def _raise_if_problems(target: str, notes: list[str], missing: list[str], unexpected: list[str], mismatched: list[str]):
    if not (notes or missing or unexpected or mismatched):
        return
    lines = [f"cannot convert: checkpoint does not match {target}"]
    lines += [f"  {note}" for note in notes]
    for title, items in (
        ("missing keys (the model needs them, the checkpoint lacks them)", missing),
        ("unexpected keys (in the checkpoint, no place in the model)", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines += [f"    {item}" for item in items]
    raise ValueError("\n".join(lines))


def require_torch():
    """The torch module, or an ImportError saying how to get it: torch is an optional dependency."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "hkt_jax.convert needs PyTorch to read or write .pt/.th files: pip install -r requirements-torch.txt "
            "(torch and torchvision; the CPU build is enough)"
        ) from error
    return torch


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``: checkpoints from the internet must not run code.

    A file that pickles Python objects (a callable, a class) is refused, and a file
    torch cannot read is reported, each as a ``ValueError`` naming the file.
    """
    if os.path.isdir(path):
        converted = os.path.isfile(os.path.join(path, MODEL_SPEC_FILE))
        raise ValueError(
            f"{path} is a directory, not a PyTorch checkpoint file (.th/.pt/.pth)"
            + (
                f": its {MODEL_SPEC_FILE} makes it an hkt_jax model checkpoint already, to use as is (parent_ckpt=)"
                if converted
                else ""
            )
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    torch = require_torch()
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:  # weights_only refuses what is not tensors and plain containers
        culprit = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if culprit:
            raise ValueError(
                f"{path}: refused: the file pickles Python code or objects, not only tensors "
                f"({culprit}); nothing in it was run. Only plain state dicts are loaded: ask for "
                "one saved with torch.save(model.state_dict(), path)"
            ) from None
        raise ValueError(f"{path}: not a PyTorch checkpoint (its pickle data is unreadable)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a PyTorch checkpoint, or a truncated one ({reason})") from None


def _unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The bare state dict inside a training checkpoint; refuses anything holding non-tensors."""
    for wrapper in STATE_DICT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_arrays = sorted(key for key, value in checkpoint.items() if not hasattr(value, "shape"))
    if not_arrays:
        raise ValueError(
            f"not a state dict: entries {not_arrays} are not tensors; expected a state dict or "
            f"a dict holding one under {list(STATE_DICT_WRAPPERS)} (top-level keys: {sorted(checkpoint)})"
        )
    return checkpoint


def _canonical_torch_key(key: str) -> str:
    """DataParallel's ``module.`` stripped, other repositories' module names rewritten to ours."""
    key = key.removeprefix(DATA_PARALLEL_PREFIX)
    for pattern, replacement in TORCH_ALIASES:
        key = pattern.sub(replacement, key)
    return key


def _as_float32_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor; .float() also covers fp16/bf16 which numpy cannot hold
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32, copy=True)


def _blocks_per_group(names: Iterable[str], block_pattern: re.Pattern) -> dict[int, int]:
    """{group: number of blocks} of the residual blocks ``names`` mention."""
    counts: dict[int, int] = {}
    for match in filter(None, map(block_pattern.match, names)):
        group, block = map(int, match.groups())
        counts[group] = max(counts.get(group, 0), block + 1)
    return dict(sorted(counts.items()))


def _depth_note(counts: dict[int, int], depth: int) -> str | None:
    """Says outright when the checkpoint is another depth; extra groups (layer4...) show up as unexpected keys."""
    wanted = (depth - 2) // 6
    counts = {group: blocks for group, blocks in counts.items() if group <= len(GROUP_WIDTHS)}
    if not counts or set(counts.values()) == {wanted}:
        return None
    if len(set(counts.values())) == 1:
        found = next(iter(counts.values()))
        return f"checkpoint has {found} blocks per group (depth {6 * found + 2}), asked for depth {depth}"
    return f"checkpoint has uneven blocks per group {counts}, asked for depth {depth} ({wanted} in each group)"


def cifar_resnet_depth(checkpoint: Any) -> int | None:
    """Depth of the CIFAR ResNet a loaded checkpoint holds, or None when it holds something else.

    Lets other converters name a CIFAR ResNet given to them (its unmatched keys would bury that):
    a 3x3 ``conv1`` stem, exactly the three residual groups with the same number of blocks each
    (an ImageNet ResNet has four) and a ``linear``/``fc`` classifier, in any layout this module reads.
    """
    if not isinstance(checkpoint, Mapping):
        return None
    try:
        state_dict = _unwrap_state_dict(checkpoint)
    except ValueError:
        return None
    shapes = {_canonical_torch_key(str(key)): tuple(value.shape) for key, value in state_dict.items()}
    stem = shapes.get("conv1.weight", ())
    if len(stem) != 4 or stem[2:] != (3, 3) or "linear.weight" not in shapes:
        return None
    blocks = _blocks_per_group(shapes, _TORCH_BLOCK)
    if set(blocks) != set(range(1, len(GROUP_WIDTHS) + 1)) or len(set(blocks.values())) != 1:
        return None
    return 6 * blocks[1] + 2


def resnet_from_torch(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    depth: int,
    *,
    num_classes: int | None = None,
    shortcut: str | None = None,
) -> dict[str, dict]:
    """PyTorch CIFAR ResNet checkpoint -> ``{"params", "batch_stats"}`` for ``CifarResNet(depth, ...)``.

    ``num_classes`` and ``shortcut`` default to what the checkpoint holds (its
    classifier size; option B when it has projection-shortcut tensors). Raises one
    ValueError listing every missing key, unexpected key and shape mismatch.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict_or_path = load_torch_checkpoint(state_dict_or_path)
    # (canonical key, key as stored, tensor); a list, so two keys that canonicalise alike are both seen.
    entries = [(_canonical_torch_key(key), key, value) for key, value in _unwrap_state_dict(state_dict_or_path).items()]

    found_shortcut = "B" if any(".shortcut." in canonical for canonical, _, _ in entries) else "A"
    shortcut = shortcut or found_shortcut
    if num_classes is None:
        classifier_biases = [value for canonical, _, value in entries if canonical == "linear.bias"]
        num_classes = int(classifier_biases[0].shape[0]) if classifier_biases else 10
    expected = dict(_expected_shapes(depth, num_classes, shortcut))

    notes = []
    depth_note = _depth_note(_blocks_per_group((canonical for canonical, _, _ in entries), _TORCH_BLOCK), depth)
    if depth_note:
        notes.append(depth_note)
    if shortcut != found_shortcut:
        notes.append(f"checkpoint has option-{found_shortcut} shortcuts, asked for shortcut={shortcut!r}")

    flat: dict[tuple[str, ...], np.ndarray] = {}
    provided: set[tuple[str, ...]] = set()  # also holds keys whose shape was wrong: those are not "missing"
    unexpected, mismatched = [], []
    for canonical_key, source_key, value in entries:
        module_name, _, param_name = canonical_key.rpartition(".")
        module = _match_module(module_name, _TORCH_MODULE_REGEXES)
        if module and param_name in TORCH_ONLY_BUFFERS.get(module.kind, ()):
            continue
        rule = next((r for r in PARAM_RULES[module.kind] if r.torch_name == param_name), None) if module else None
        flax_key = (rule.collection, *module.flax_module.split("/"), rule.flax_name) if rule else None
        if flax_key not in expected:
            unexpected.append(f"{source_key} {tuple(value.shape)}")
            continue
        if flax_key in provided:
            unexpected.append(f"{source_key} {tuple(value.shape)} (a second tensor for {'/'.join(flax_key)})")
            continue
        provided.add(flax_key)
        wanted_torch_shape = _torch_shape(expected[flax_key], rule)
        if tuple(value.shape) != wanted_torch_shape:
            mismatched.append(
                f"{source_key}: checkpoint {tuple(value.shape)}, model expects {wanted_torch_shape} "
                f"(-> {'/'.join(flax_key)} {expected[flax_key]})"
            )
            continue
        array = _as_float32_numpy(value)
        if rule.torch_to_flax_axes:
            array = np.ascontiguousarray(array.transpose(rule.torch_to_flax_axes))
        flat[flax_key] = array

    if entries and not provided:  # another architecture altogether: its key list would only bury that
        first = ", ".join(source_key for _, source_key, _ in entries[:5])
        raise ValueError(
            f"cannot convert: not a CIFAR ResNet checkpoint: none of its {len(entries)} tensors has a "
            f"place in {_model_name(depth, num_classes, shortcut)} (its first keys: {first}; a CIFAR "
            "ResNet's are conv1.weight, bn1.weight, ..., layer1.0.conv1.weight, ..., linear.weight)"
        )
    missing = []
    for flax_key, shape in sorted(expected.items(), key=lambda item: _export_order(_flax_module_of(item[0]))):
        if flax_key not in provided:
            torch_key, rule = _torch_key_for(flax_key)
            missing.append(f"{torch_key} {_torch_shape(shape, rule)} (-> {'/'.join(flax_key)})")
    _raise_if_problems(_model_name(depth, num_classes, shortcut), notes, missing, unexpected, mismatched)
    return traverse_util.unflatten_dict(flat)


def resnet_config(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``CifarResNet`` kwargs (depth, num_classes, shortcut) that ``variables`` were made for."""
    params = variables.get("params", {})
    blocks = _blocks_per_group(params, _FLAX_BLOCK)
    classifier_bias = params.get("fc", {}).get("bias")
    return {
        "depth": 6 * blocks.get(1, 1) + 2,
        "num_classes": int(classifier_bias.shape[0]) if classifier_bias is not None else 10,
        "shortcut": "B"
        if any(isinstance(module, Mapping) and "shortcut_conv" in module for module in params.values())
        else "A",
    }


def _flax_module_of(flax_key: tuple[str, ...]) -> str:
    return "/".join(flax_key[1:-1])


def _export_order(flax_module: str) -> tuple[int, int, int, int]:
    """Stem, then groups and blocks numerically (flax sorts layer1_10 before layer1_2), then the head."""
    module = _model_module(flax_module)
    if "g" in module.fields:
        return (1, int(module.fields["g"]), int(module.fields["b"]), module.row)
    return (0 if module.kind != LINEAR else 2, 0, 0, module.row)


def resnet_to_torch(variables: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Flax ``CifarResNet`` variables -> PyTorch state dict (akamaster layout; option B as ``shortcut.0/1``).

    Loads with ``strict=True`` into the matching PyTorch model. Raises one
    ValueError listing every variable that does not fit the inferred architecture.
    """
    torch = require_torch()
    config = resnet_config(variables)
    expected = dict(_expected_shapes(**config))
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))

    unexpected = [f"{'/'.join(key)} {tuple(np.shape(value))}" for key, value in flat.items() if key not in expected]
    missing = [f"{'/'.join(key)} {shape}" for key, shape in expected.items() if key not in flat]
    mismatched = [
        f"{'/'.join(key)}: variables {tuple(np.shape(flat[key]))}, model expects {shape}"
        for key, shape in expected.items()
        if key in flat and tuple(np.shape(flat[key])) != shape
    ]
    _raise_if_problems(_model_name(**config), [], missing, unexpected, mismatched)

    modules = sorted({_flax_module_of(key) for key in expected}, key=_export_order)
    state_dict = OrderedDict()
    for flax_module in modules:
        module = _model_module(flax_module)
        for rule in PARAM_RULES[module.kind]:
            array = np.asarray(flat[(rule.collection, *flax_module.split("/"), rule.flax_name)], dtype=np.float32)
            if rule.torch_to_flax_axes:
                array = array.transpose(np.argsort(rule.torch_to_flax_axes))
            torch_key = f"{module.torch_module}.{rule.torch_name}"
            state_dict[torch_key] = torch.from_numpy(np.array(array, order="C", copy=True))
        for buffer in TORCH_ONLY_BUFFERS.get(module.kind, ()):
            state_dict[f"{module.torch_module}.{buffer}"] = torch.zeros((), dtype=torch.long)
    return state_dict
