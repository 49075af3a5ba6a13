"""Start-up checks of a run, before anything is trained or written.

``experiment.run`` calls ``check_run`` first: the workdir can be created and
written (and is not a file), the disk has room, the parent checkpoint is a
model checkpoint, the data path exists, and a workdir that already holds a run
was started with the same config (``check_config_change``). Config values are
checked earlier still, when the config dataclasses are made. Every failure is a
``cli.UserError`` naming the key or path; none of these checks creates a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hkt_jax.training import checkpoint
from hkt_jax.training.faults import UserError
from hkt_jax.training.methods import NEEDS_PARENT

CONFIG_FILE = "config.json"
MIN_FREE_BYTES = 64 * 2**20  # a few checkpoints of a CIFAR ResNet; less than this fails at the first save

# Keys a resumed run may change without --allow_config_change: how long to train, how often to
# log / evaluate / save, how the same computation is laid out, where caches go.
SAFE_TO_CHANGE = (
    "train.steps",
    "train.epochs",
    "parent_epochs",
    "train.log_every_steps",
    "train.eval_every_steps",
    "train.checkpoint_every_steps",
    "train.checkpoint_every_minutes",
    "train.skip_nonfinite_steps",
    "mesh.data",
    "mesh.model",
    "mesh.shard_trainable",
    "child.conv_impl",
    "parent.conv_impl",
    "data.cache_dir",
)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_workdir(workdir: str | os.PathLike) -> None:
    """The workdir is (or can become) a writable directory on a disk with room; nothing is created."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: is a file, not a directory")
    existing = _nearest_existing(workdir)
    if not existing.is_dir():
        raise UserError(f"--workdir {workdir}: {existing} is a file, not a directory")
    for directory in (existing, workdir / checkpoint.CHECKPOINTS_SUBDIR):
        if not directory.is_dir():
            continue
        try:
            with tempfile.TemporaryFile(dir=directory, prefix=".hkt_write_test"):
                pass
        except OSError as error:
            raise UserError(
                f"--workdir {workdir}: cannot write in {directory} ({error.strerror or error}); "
                "choose a writable --workdir"
            ) from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"--workdir {workdir}: only {free / 2**20:.0f} MiB free on its disk; checkpoints need "
            f"at least {MIN_FREE_BYTES / 2**20:.0f} MiB: free some space or choose another --workdir"
        )


def check_model_checkpoint(path: str | os.PathLike, key: str = "parent_ckpt") -> None:
    """``path`` is a model checkpoint directory (``model.json`` naming an architecture + orbax variables)."""
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{key}={str(path)!r}: no such directory")
    if not directory.is_dir():
        raise UserError(
            f"{key}={str(path)!r}: is a file; expected a model checkpoint directory (write one with "
            "`python -m hkt_jax.convert` or take a run's export/child)"
        )
    spec_file = directory / checkpoint.MODEL_SPEC_FILE
    try:
        spec = json.loads(spec_file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{key}={str(path)!r}: not a model checkpoint ({checkpoint.MODEL_SPEC_FILE} is missing; "
            "write one with `python -m hkt_jax.convert` or take a run's export/child)"
        ) from None
    except (OSError, ValueError) as error:
        raise UserError(f"{key}={str(path)!r}: {checkpoint.MODEL_SPEC_FILE} is unreadable ({error})") from None
    if not isinstance(spec, dict) or "arch" not in spec:
        raise UserError(f"{key}={str(path)!r}: {checkpoint.MODEL_SPEC_FILE} names no architecture ('arch')")
    if not (directory / checkpoint.VARIABLES_ITEM).is_dir():
        raise UserError(f"{key}={str(path)!r}: the weights ({checkpoint.VARIABLES_ITEM}/) are missing")


def check_data_path(data: Any) -> None:
    """``data.path``, when set, exists (each source reads its own layout later and names bad files)."""
    path = getattr(data, "path", None)
    if path and not Path(path).exists():
        raise UserError(f"data.path={str(path)!r}: no such file or directory")


def _flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(record, dict):
        return {prefix[:-1]: record}
    flat: dict[str, Any] = {}
    for key, value in record.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for keys both records hold (a field added or removed since is not compared)."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    return {k: (old_flat[k], new_flat[k]) for k in sorted(set(old_flat) & set(new_flat)) if old_flat[k] != new_flat[k]}


def normalized_record(config: Any) -> dict[str, Any]:
    """``config.record()`` as it reads back from ``config.json`` (tuples become lists)."""
    return json.loads(json.dumps(config.record(), default=str))


def check_config_change(config: Any, workdir: str | os.PathLike, allow: bool = False) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume ``workdir`` with a config that differs in keys not in ``SAFE_TO_CHANGE``
    (unless ``allow``); returns every difference (the caller reports them)."""
    workdir = Path(workdir)
    config_file = workdir / CONFIG_FILE
    started = checkpoint.has_training_checkpoints(workdir) or (workdir / "summary.json").exists()
    if not (started and config_file.is_file()):
        return {}
    try:
        old = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{config_file}: unreadable ({error}); it records the config this workdir was started with")
    differences = config_differences(old, normalized_record(config))
    unsafe = {k: v for k, v in differences.items() if k not in SAFE_TO_CHANGE}
    if unsafe and not allow:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
        raise UserError(
            f"--workdir {workdir} was started with a different config ({listed}); rerun with the "
            "original values, use a new --workdir, or pass --allow_config_change to continue with the "
            "new ones"
        )
    return differences


def check_run(
    config: Any, workdir: str | os.PathLike, *, runs: list[tuple[Any, Path]] = (), allow_config_change: bool = False
) -> None:
    """Everything ``experiment.run`` can check before it starts; ``runs`` = the (config, workdir) it will train."""
    check_workdir(workdir)
    if config.parent_ckpt and config.method in NEEDS_PARENT:
        check_model_checkpoint(config.parent_ckpt)
    if config.init_ckpt and not (Path(workdir) / checkpoint.CHECKPOINTS_SUBDIR).exists():  # only a fresh start reads it
        check_model_checkpoint(config.init_ckpt, key="init_ckpt")
    check_data_path(config.data)
    for run_config, run_workdir in runs:
        check_config_change(run_config, run_workdir, allow_config_change)
