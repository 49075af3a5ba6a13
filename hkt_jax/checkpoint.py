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
    if jax.process_index() == 0:  # multi-host: every process calls save_model (orbax syncs them)
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


# -- resumable training state ------------------------------------------------------------------


def training_manager(workdir: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Checkpoints of (train state, data-iterator position) under ``workdir/checkpoints``.

    The parent is never in here: it is an input of the run, not its state.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints", options=options, item_names=("state", "data")
    )


def save_training(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any]) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=True,
    )
    manager.wait_until_finished()


def restore_training(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, data-iterator state) of the latest checkpoint, or None for a fresh run.

    ``abstract_state`` (shapes, dtypes, shardings) says where each array goes.
    """
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["data"]
