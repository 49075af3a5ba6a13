"""The whole job behind ``python -m experiments.cifar_hkt``.

HKT and KD need a pretrained parent. Given ``parent_ckpt`` it is loaded;
without one the parent is first trained from scratch in ``workdir/parent``
(itself resumable, and reused once finished), then the child is trained with
it - so the bare command reproduces the paper's pipeline end to end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from hkt_jax.training import preflight
from hkt_jax.training.config import ExperimentConfig
from hkt_jax.training.methods import NEEDS_PARENT
from hkt_jax.training.train import train_and_evaluate

PARENT_SUBDIR = "parent"
EXPORT_SUBDIR = Path("export") / "child"  # where a run leaves its trained network (child or parent alike)


def with_parent_schedule(config: ExperimentConfig) -> ExperimentConfig:
    """A parent trains for ``parent_epochs``, whether planned by a child's job or run as ``method=parent``."""
    if config.parent_epochs is None:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=config.parent_epochs))


def parent_run_config(config: ExperimentConfig) -> ExperimentConfig:
    return with_parent_schedule(dataclasses.replace(config, method="parent", parent_ckpt=None, init_ckpt=None))


def parent_workdir_and_checkpoint(workdir: Path) -> tuple[Path, Path]:
    parent_workdir = workdir / PARENT_SUBDIR
    return parent_workdir, parent_workdir / EXPORT_SUBDIR


def planned_runs(config: ExperimentConfig, workdir: Path) -> list[tuple[ExperimentConfig, Path]]:
    """The (config, workdir) of each training run ``run`` makes, in order (the parent's first when needed)."""
    if config.method == "parent":
        return [(with_parent_schedule(config), workdir)]
    if config.method not in NEEDS_PARENT or config.parent_ckpt:
        return [(config, workdir)]
    parent_workdir, parent_ckpt = parent_workdir_and_checkpoint(workdir)
    return [
        (parent_run_config(config), parent_workdir),
        (dataclasses.replace(config, parent_ckpt=str(parent_ckpt)), workdir),
    ]


def ensure_parent(config: ExperimentConfig, workdir: Path, *, allow_config_change: bool = False) -> ExperimentConfig:
    """The config with ``parent_ckpt`` set: the given one, or a parent trained here first."""
    if config.parent_ckpt:
        return config
    parent_workdir, parent_ckpt = parent_workdir_and_checkpoint(workdir)
    if not (parent_workdir / "summary.json").exists():
        if jax.process_index() == 0:
            print(
                f"No parent_ckpt given: training the parent ({config.parent.arch}, {config.parent.kwargs()}) "
                f"in {parent_workdir} first"
            )
        train_and_evaluate(parent_run_config(config), parent_workdir, allow_config_change=allow_config_change)
    return dataclasses.replace(config, parent_ckpt=str(parent_ckpt))


def run(config: ExperimentConfig, workdir: str | Path, *, allow_config_change: bool = False) -> dict:
    """Check everything that can be checked (``hkt_jax.training.preflight``), then train the parent if needed and the run.

    Bad input raises ``cli.UserError`` before anything is written; see ``train_and_evaluate`` for early stops.
    """
    workdir = Path(workdir)
    runs = planned_runs(config, workdir)
    preflight.check_run(config, workdir, runs=runs, allow_config_change=allow_config_change)
    if config.method == "parent":
        config = runs[0][0]
    if config.method in NEEDS_PARENT:
        config = ensure_parent(config, workdir, allow_config_change=allow_config_change)
    return train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
