"""Name <-> model class, so configs and checkpoints can say what to build (``model.json``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from hkt_jax.models.cifar_resnet import CifarResNet
from hkt_jax.models.raft import RAFT
from hkt_jax.models.toy import ToyStagedNet
from hkt_jax.models.unet import DenseUNet, PocketNet, UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cifar_resnet": CifarResNet,
    "dense_unet": DenseUNet,
    "pocketnet": PocketNet,
    "raft": RAFT,
    "toy": ToyStagedNet,
    "unet": UNet,
}

# The ModelConfig fields each architecture takes from an experiment config (the task adds e.g. num_classes).
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "cifar_resnet": ("depth", "shortcut", "conv_impl"),
    "raft": ("small",),
    "toy": ("widths", "strides", "per_pixel"),
    "unet": ("widths",),
    "pocketnet": ("width", "depth"),
    "dense_unet": ("widths",),
}


def config_fields(arch: str) -> tuple[str, ...]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return CONFIG_FIELDS.get(arch, ())


def model_spec(arch: str, **kwargs: Any) -> dict[str, Any]:
    config_fields(arch)
    return {"arch": arch, "kwargs": dict(kwargs)}


def accepted_kwargs(arch: str) -> set[str]:
    return {f.name for f in dataclasses.fields(ARCHITECTURES[arch]) if f.name not in ("parent", "name")}


def build_model(spec: dict[str, Any], **overrides: Any) -> nn.Module:
    """Instantiate the model a spec names; ``overrides`` replace kwargs the architecture takes
    (e.g. ``stage_split``, ``conv_impl``) and are ignored by architectures without them."""
    arch = spec.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model spec names unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    accepted = accepted_kwargs(arch)
    kwargs = {**spec.get("kwargs", {}), **{k: v for k, v in overrides.items() if k in accepted}}
    return ARCHITECTURES[arch](**kwargs)


def parameter_count(params: Any) -> int:
    """Number of scalars in a parameter tree (as reported for every trained or converted model)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
