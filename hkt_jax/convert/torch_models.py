"""The PyTorch networks hkt_jax's converters read and write, and a loader for exported children.

``CifarResNet`` is akamaster/pytorch_resnet_cifar10's ``resnet.py`` (BSD-2-Clause,
Copyright (c) 2018 Yerlan Idelbayev) with the option-B projection shortcut the
distillation repos use: the layout ``resnet_from_torch`` reads and
``resnet_to_torch`` writes, so a converted or exported state dict loads with
``strict=True``. ``load_exported`` turns a ``python -m hkt_jax.convert
export-torch`` file into a ready model plus the preprocessing it was trained with.

Needs PyTorch (``pip install -r requirements-torch.txt``); the rest of hkt_jax does not.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import torch  # noqa: F401  (checked here so the error names this module and the fix)
    from torch import nn
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "hkt_jax.convert.torch_models defines PyTorch models and needs PyTorch: "
        "pip install -r requirements-torch.txt (torch==2.14.1, torchvision==0.29.1)"
    ) from error

# The network and its preprocessing live in a file that imports only torch and numpy: export-torch
# copies it beside the weights, so a deployment box needs neither jax nor hkt_jax.
from hkt_jax.convert.hkt_cifar_resnet import (  # noqa: E402  (after the torch check above)
    EXPORT_FORMAT,
    BasicBlock,
    CifarResNet,
    OptionAShortcut,
    Preprocess,
    RawImageClassifier,
)
from hkt_jax.convert.resnet import load_torch_checkpoint  # noqa: E402

__all__ = [
    "EXPORT_FORMAT",
    "TORCH_MODELS",
    "BasicBlock",
    "CifarResNet",
    "OptionAShortcut",
    "Preprocess",
    "RawImageClassifier",
    "load_exported",
    "preprocessing_record",
]

# Architecture names of hkt_jax model specs -> the PyTorch class an export of that architecture loads into.
TORCH_MODELS = {"cifar_resnet": CifarResNet}


# --- exported children -------------------------------------------------------------------------------------------


def preprocessing_record(mean, std, image_size, class_names) -> dict[str, Any]:
    """The JSON-able description of what an exported network expects (written by export-torch)."""
    return {
        "input_range": [0, 255],
        "channels": "RGB",
        "layout": "NCHW",
        "formula": "(x / 255 - mean) / std, per channel",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "image_size": [int(n) for n in image_size],
        "class_names": [str(name) for name in class_names],
    }


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, Preprocess]:
    """An ``export-torch`` file -> (network in eval mode, loaded with ``strict=True``; its ``Preprocess``)."""
    exported = load_torch_checkpoint(path)
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        found = sorted(exported) if isinstance(exported, dict) else type(exported).__name__
        raise ValueError(
            f"{path} is not a {EXPORT_FORMAT} file (found {found}); "
            "write it with python -m hkt_jax.convert export-torch"
        )
    torch_model = exported["torch_model"]
    if torch_model["arch"] not in TORCH_MODELS:
        raise ValueError(
            f"{path}: no PyTorch model for architecture {torch_model['arch']!r}; known: {sorted(TORCH_MODELS)}"
        )
    model = TORCH_MODELS[torch_model["arch"]](**torch_model["kwargs"])
    model.load_state_dict(exported["state_dict"], strict=True)
    return model.eval(), Preprocess.from_record(exported["preprocessing"])
