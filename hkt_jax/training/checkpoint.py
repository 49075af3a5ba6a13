"""Orbax checkpoints: a model's variables on their own (parents, exported children)
and the resumable training state.

A *model checkpoint* is a directory holding ``model.json`` (what to build:
architecture name and constructor kwargs, plus free-form metadata) and an
orbax ``variables/`` item with ``{"params", "batch_stats"}``. Parents converted
from PyTorch and exported children share it, so either can be loaded without
the code that produced it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from hkt_jax.training.faults import CheckpointSaveError, UserError

MODEL_SPEC_FILE = "model.json"
VARIABLES_ITEM = "variables"
MODEL_ENTRIES = frozenset({MODEL_SPEC_FILE, VARIABLES_ITEM})


def save_model(directory: str | os.PathLike, variables: Any, spec: dict[str, Any]) -> Path:
    """Write ``variables`` and the ``spec`` that rebuilds the model (overwrites), all or nothing.

    Both are written into a sibling ``.NAME.partial`` directory that then takes
    ``directory``'s place, so a run killed while it exports leaves the previous
    model whole (or none), never variables without ``model.json`` or a spec
    beside other variables. ``recover_model`` finishes a swap that was cut off.
    """
    directory = Path(directory).absolute()
    partial, previous = _swap_paths(directory)
    if directory.is_dir() and (others := sorted({p.name for p in directory.iterdir()} - MODEL_ENTRIES)):
        raise UserError(
            f"refusing to replace {directory} with a model: it holds {', '.join(others[:5])}, which a model "
            f"directory ({MODEL_SPEC_FILE} and {VARIABLES_ITEM}/) does not; choose a new or empty directory"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_count() == 1 and partial.exists():  # left by a run killed while it exported
        shutil.rmtree(partial)
    host_vars = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(partial / VARIABLES_ITEM, host_vars, force=True)
    if jax.process_index() == 0:  # multi-host: every process calls save_model (orbax syncs them)
        (partial / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            if previous.exists():
                shutil.rmtree(previous)
            directory.rename(previous)
        partial.rename(directory)
        if previous.exists():
            shutil.rmtree(previous)
    return directory


def load_model_spec(directory: str | os.PathLike) -> dict[str, Any]:
    spec_path = Path(directory) / MODEL_SPEC_FILE
    if not spec_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a model checkpoint: {MODEL_SPEC_FILE} is missing (expected a directory "
            "written by `python -m hkt_jax.convert` or by a training run's export)"
        )
    return json.loads(spec_path.read_text())


def recover_model(directory: str | os.PathLike) -> bool:
    """Put back the model ``save_model`` was replacing when its process died between its two renames;
    True when ``directory`` holds a model afterwards. A directory that lacks ``model.json`` (killed
    mid-write by a version that wrote in place) is moved to ``NAME.unreadable`` (``.1``, ``.2``, ... when
    taken) with a warning: kept, never deleted, and no longer mistaken for a model."""
    directory = Path(directory).absolute()
    _, previous = _swap_paths(directory)
    if jax.process_index() == 0:  # as in save_model: one process moves files, the others wait for it
        if not directory.exists() and previous.exists():
            previous.rename(directory)
        if directory.exists() and not (directory / MODEL_SPEC_FILE).is_file():
            aside = _unused(directory.with_name(directory.name + ".unreadable"))
            directory.rename(aside)
            warnings.warn(
                f"{directory} was half-written ({MODEL_SPEC_FILE} is missing); moved to {aside}", stacklevel=2
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hkt_jax: model directory recovered")
    return (directory / MODEL_SPEC_FILE).is_file()


def _swap_paths(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(f".{directory.name}.partial"), directory.with_name(f".{directory.name}.previous")


def _unused(path: Path) -> Path:
    """``path``, else ``path.1``, ``path.2``, ...: what is set aside is never overwritten."""
    candidate, suffix = path, 1
    while candidate.exists():
        candidate, suffix = path.with_name(f"{path.name}.{suffix}"), suffix + 1
    return candidate


def load_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (variables as numpy pytree, spec)."""
    directory = Path(directory).absolute()
    spec = load_model_spec(directory)
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(directory / VARIABLES_ITEM)
    return variables, spec


# -- resumable training state ------------------------------------------------------------------

CHECKPOINTS_SUBDIR = "checkpoints"
UNREADABLE_SUBDIR = "checkpoints_unreadable"  # where restore moves steps it could not read (never deleted)


def training_manager(workdir: str | os.PathLike, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Checkpoints of (train state, data-iterator position, loop state) under ``workdir/checkpoints``.

    The parent is never in here: it is an input of the run, not its state. Saves
    are asynchronous (``save_training``/``finish_save``): orbax copies the arrays
    to the host, returns, and writes in a background thread, each step into a
    temporary directory renamed into place when complete, so a save that fails
    (disk full) leaves the previous steps as they were.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        Path(workdir).absolute() / CHECKPOINTS_SUBDIR, options=options, item_names=("state", "data", "loop")
    )


@dataclasses.dataclass(frozen=True)
class PendingSave:
    """A save still being written: its step and the newest finished one before it (what a failure keeps)."""

    step: int
    previous: int | None


def save_training(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: dict[str, Any],
    loop_state: dict[str, Any] | None = None,
) -> PendingSave:
    """Start saving one step; ``finish_save`` waits for it (and ``manager.close`` does).

    The arrays are on the host when this returns, so ``state`` may be donated to
    the next step at once. Call ``finish_save`` of the previous save first: its
    failure is then reported as its own step. A failure raises
    ``CheckpointSaveError`` naming the intact previous step.
    """
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state)}
    if loop_state is not None:
        items["loop"] = ocp.args.JsonSave(loop_state)
    previous = manager.latest_step()
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # disk full, read-only or vanished directory, quota: all end the run
        raise _save_failed(manager, step, previous, error) from error
    return PendingSave(step, previous)


def finish_save(manager: ocp.CheckpointManager, pending: PendingSave | None) -> None:
    """Wait until ``pending`` (the manager's last save) is written; its failure raises ``CheckpointSaveError``."""
    try:
        manager.wait_until_finished()
    except Exception as error:
        if pending is None:
            raise
        raise _save_failed(manager, pending.step, pending.previous, error) from error


def _save_failed(manager: ocp.CheckpointManager, step: int, previous: int | None, error: BaseException):
    _drop_orbax_logs()  # the one line below says it all; orbax's threads would add tracebacks of it
    kept = (
        f"the previous checkpoint (step {previous}) is intact; free space or fix the directory and rerun "
        f"the same command to continue from step {previous}"
        if previous is not None
        else "no earlier checkpoint exists; fix the directory and rerun the same command to start again"
    )
    return CheckpointSaveError(
        f"error: could not save the checkpoint of step {step} in {manager.directory} "
        f"({type(error).__name__}: {_first_line(error)}); {kept}"
    )


class _OrbaxLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


def _drop_orbax_logs() -> None:
    """From now on, drop orbax's log records: after a failed save its background threads log tracebacks of
    the same failure (while the error is raised, or later, when the process exits)."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxLogs) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxLogs())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: dict[str, Any]
    loop: dict[str, Any]
    skipped: list[str]  # "step N (why)" for each newer step that could not be read


def restore_latest_readable(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
    """The newest checkpoint that reads back, or None when there is none (a fresh run).

    A step that fails to read (truncated or missing file, half-written step) is
    warned about by name and moved to ``checkpoints_unreadable/`` (kept, so the
    next save of that step number cannot collide with it), and the next older
    one is tried. When steps exist but none reads, ``UserError`` says so.
    ``abstract_state`` (shapes, dtypes, shardings) says where each array goes.
    """
    manager.wait_until_finished()  # a save of this manager still being written is not read half-made
    steps = sorted(manager.all_steps(), reverse=True)
    skipped: list[str] = []
    _quiet_late_callbacks_of_failed_restores()  # before the first try: they can fire while its error unwinds
    for step in steps:
        step_dir = Path(manager.directory) / str(step)
        items = {"state": ocp.args.StandardRestore(abstract_state), "data": ocp.args.JsonRestore()}
        if (step_dir / "loop").exists():  # checkpoints written before the loop state existed have none
            items["loop"] = ocp.args.JsonRestore()
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax/tensorstore raise many types for a damaged step
            skipped.append(f"step {step} ({type(error).__name__}: {_first_line(error)})")
            continue
        if skipped:
            _set_aside(manager, [int(s.split()[1]) for s in skipped])
            warnings.warn(
                f"{manager.directory}: unreadable newer checkpoint(s) {'; '.join(skipped)}; moved to "
                f"{Path(manager.directory).parent / UNREADABLE_SUBDIR}; resuming from step {step}",
                stacklevel=2,
            )
        return Restored(step, restored["state"], restored["data"], dict(restored.get("loop") or {}), skipped)
    if skipped:
        old_format = any("tree structures do not match" in s for s in skipped) and any(
            "'rng'" in _read_text(Path(manager.directory) / str(step) / "state" / "_METADATA") for step in steps
        )
        hint = (
            " (these train states have an 'rng' leaf: they were written by hkt_jax before the Task "
            "redesign; finish that run with the earlier version)"
            if old_format
            else ""
        )
        raise UserError(
            f"no readable checkpoint in {manager.directory}: {'; '.join(skipped)}{hint}. Move that "
            "directory away to start from step 0, or use a new --workdir"
        )
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _quiet_late_callbacks_of_failed_restores() -> None:
    """A failed orbax restore leaves tensorstore reads (coroutines such as
    ``_read_array_index_and_device_put``) whose callbacks find orbax's event loop closed, while the error
    unwinds or later; each would print a harmless ``Exception ignored in: <coroutine ...>`` /
    ``RuntimeError: Event loop is closed`` traceback (hundreds of lines for a large state). Drop those
    (only those) from ``sys.unraisablehook``; anything else still prints."""
    previous = sys.unraisablehook
    if getattr(previous, "hkt_quiet_closed_loop", False):
        return

    def hook(unraisable):
        if _is_orbax_closed_loop_noise(unraisable):
            return
        previous(unraisable)

    hook.hkt_quiet_closed_loop = True
    sys.unraisablehook = hook


def _is_orbax_closed_loop_noise(unraisable) -> bool:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine of orbax's, collected unfinished
    return (
        code is not None
        and f"{os.sep}orbax{os.sep}" in code.co_filename
        and isinstance(error, (RuntimeError, asyncio.CancelledError, GeneratorExit))
    )


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move unreadable steps out of the manager's directory (process 0; the others wait for it)."""
    directory = Path(manager.directory)
    if jax.process_index() == 0:
        target = directory.parent / UNREADABLE_SUBDIR
        target.mkdir(exist_ok=True)
        for step in steps:
            shutil.move(str(directory / str(step)), _unused(target / str(step)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hkt_jax: unreadable checkpoints set aside")
    manager.reload()


def has_training_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds at least one finished training step (without opening orbax)."""
    directory = Path(workdir) / CHECKPOINTS_SUBDIR
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
