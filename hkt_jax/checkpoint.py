"""Orbax checkpoints: a model's variables on their own (parents, exported children)
and the resumable training state.

A *model checkpoint* is a directory holding ``model.json`` (what to build:
architecture name and constructor kwargs, plus free-form metadata) and an
orbax ``variables/`` item with ``{"params", "batch_stats"}``. Parents converted
from PyTorch and exported children share it, so either can be loaded without
the code that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_SPEC_FILE = "model.json"
VARIABLES_ITEM = "variables"


def save_model(directory: str | os.PathLike, variables: Any, spec: dict[str, Any]) -> Path:
    """Write ``variables`` and the ``spec`` that rebuilds the model (overwrites)."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    host_vars = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / VARIABLES_ITEM, host_vars, force=True)
    (directory / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory


def load_model_spec(directory: str | os.PathLike) -> dict[str, Any]:
    spec_path = Path(directory) / MODEL_SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a model checkpoint: {MODEL_SPEC_FILE} is missing (expected a directory "
            "written by `python -m hkt_jax.convert` or by a training run's export)"
        )
    return json.loads(spec_path.read_text())


def load_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (variables as numpy pytree, spec)."""
    directory = Path(directory).absolute()
    spec = load_model_spec(directory)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / VARIABLES_ITEM)
    return variables, spec
