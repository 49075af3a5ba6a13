"""Name <-> model class, so checkpoints can say what to rebuild (``model.json``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from hkt_jax.models.cifar_resnet import CifarResNet
from hkt_jax.models.toy import ToyStagedNet

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cifar_resnet": CifarResNet,
    "toy": ToyStagedNet,
}


def model_spec(arch: str, **kwargs: Any) -> dict[str, Any]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return {"arch": arch, "kwargs": dict(kwargs)}


def build_model(spec: dict[str, Any], **overrides: Any) -> nn.Module:
    """Instantiate the model a spec names; ``overrides`` replace kwargs (e.g. stage_split)."""
    arch = spec.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model spec names unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    kwargs = {**spec.get("kwargs", {}), **overrides}
    return ARCHITECTURES[arch](**kwargs)


def parameter_count(params: Any) -> int:
    """Number of scalars in a parameter tree (as reported for every trained or converted model)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
