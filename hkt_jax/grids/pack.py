"""A grid's state in a few small files, so the next accelerator slot (a fresh machine) can continue it.

Why: GPU slots (Slurm time limits, spot instances, shared cards) end, and what goes to and comes back from
a slot is small. ``pack`` keeps only what continuing needs: of a finished run its records (summary, config,
metrics.jsonl with the evaluation curve, logs); of an unfinished run its newest complete checkpoint (not
the older ones), ``best/`` and ``tensorboard/``, so it resumes exactly where it stopped; of the shared
parent its export when finished (what every run loads), else its newest checkpoint. At most
``MAX_FILES`` files and ``MAX_BYTES`` bytes, checked before anything is put in place: the pack is written
to a temporary folder and renamed. ``unpack`` restores a root from it.

Layout of a pack::

    manifest.json       grid, root, commit, each run's status and what was packed, file sizes
    finished.tar.gz     finished runs (records only)
    unfinished.tar.gz   partial and failed runs (newest checkpoint, best/, records)
    parent.tar.gz       the shared parent (export when finished, else newest checkpoint)
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from hkt_jax.grids import comparison
from hkt_jax.training.checkpoint import CHECKPOINTS_SUBDIR
from hkt_jax.training.preflight import CONFIG_FILE

MANIFEST = "manifest.json"
FINISHED, UNFINISHED, PARENT = "finished.tar.gz", "unfinished.tar.gz", "parent.tar.gz"
MAX_FILES = 5
MAX_BYTES = 25 * 2**20
FORMAT = 1
UNFINISHED_SUBDIRS = ("best", "tensorboard")  # with the newest checkpoint: what resuming reads
FINISHED_PARENT_SUBDIRS = ("export",)  # what the runs load (``parent_ckpt=ROOT/parent/export/child``)


class PackError(ValueError):
    """A pack that cannot be written (too big) or read (missing, another grid, a root holding its runs)."""


def newest_checkpoint_step(run_directory: Path) -> int | None:
    """The newest complete checkpoint step (orbax renames a step into place when it is complete)."""
    directory = Path(run_directory) / CHECKPOINTS_SUBDIR
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=None)


def _records(run_directory: Path) -> list[Path]:
    """The run's top-level files: summary, config, metrics.jsonl, run.log, failure and attempt records."""
    return sorted(p for p in run_directory.iterdir() if p.is_file())


def run_members(run_directory: Path, status: str, *, parent: bool = False) -> list[Path]:
    """The paths (files or folders) of one run that a pack keeps, given its status."""
    run_directory = Path(run_directory)
    if status == "pending" or not run_directory.is_dir():
        return []
    members = _records(run_directory)
    if status == "done":
        subdirs = FINISHED_PARENT_SUBDIRS if parent else ()
    else:
        subdirs = UNFINISHED_SUBDIRS
        step = newest_checkpoint_step(run_directory)
        if step is not None:
            members.append(run_directory / CHECKPOINTS_SUBDIR / str(step))
    members += [run_directory / name for name in subdirs if (run_directory / name).is_dir()]
    return members


def _write_tar(path: Path, root: Path, members: Iterable[Path]) -> None:
    # Fixed member metadata (mtime of the files kept, no owner names): a pack of the same runs is the same.
    with tarfile.open(path, "w:gz", compresslevel=9) as tar:
        for member in members:
            tar.add(member, arcname=str(member.relative_to(root)), filter=_anonymous)


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def plan(grid: comparison.Grid, root: Path, variants: Iterable[str], seeds: Iterable[int]) -> dict[str, Any]:
    """Which run goes into which file, with its status and newest checkpoint step."""
    root = Path(root)
    runs: dict[str, dict[str, Any]] = {}
    targets = [(f"{v}/seed{s}", comparison.run_dir(root, v, s), False) for s in seeds for v in variants]
    if grid.parent is not None:
        targets.insert(0, (comparison.PARENT_DIR, comparison.parent_dir(root), True))
    for name, directory, is_parent in targets:
        status = comparison.run_status(directory)
        entry: dict[str, Any] = {
            "status": status,
            "members": [str(p.relative_to(root)) for p in run_members(directory, status, parent=is_parent)],
        }
        if entry["members"]:
            entry["file"] = PARENT if is_parent else FINISHED if status == "done" else UNFINISHED
        if status != "done":
            entry["checkpoint_step"] = newest_checkpoint_step(directory) if directory.is_dir() else None
        runs[name] = entry
    return runs


def pack(
    grid_name: str,
    grid: comparison.Grid,
    root: Path,
    out: Path,
    variants: Iterable[str],
    seeds: Iterable[int],
    *,
    commit: str | None = None,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Write the pack of ``root`` to ``out`` (replacing an older pack there); returns the manifest.

    Raises ``PackError`` listing every file's size when the pack would exceed ``max_bytes`` (nothing at
    ``out`` is changed then)."""
    root, out = Path(root), Path(out)
    runs = plan(grid, root, list(variants), list(seeds))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for file_name in (FINISHED, UNFINISHED, PARENT):
            members = [root / m for entry in runs.values() if entry.get("file") == file_name for m in entry["members"]]
            if members:
                _write_tar(staging / file_name, root, members)
        manifest = {
            "format": FORMAT,
            "grid": grid_name,
            "root": str(root),
            "parent_export": str(comparison.parent_dir(root) / "export" / "child"),
            "commit": commit,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "runs": runs,
            "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
        }
        manifest_text = json.dumps(manifest, indent=1)
        # The manifest counts too; its own size is known once written, so add a generous allowance for it.
        manifest["files"][MANIFEST] = len(manifest_text.encode()) + 64
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        manifest["files"][MANIFEST] = (staging / MANIFEST).stat().st_size
        check_limits(manifest["files"], max_bytes=max_bytes)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_limits(sizes: dict[str, int], *, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES) -> None:
    total = sum(sizes.values())
    if len(sizes) > max_files or total > max_bytes:
        listed = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in sorted(sizes.items()))
        raise PackError(
            f"the pack would be {len(sizes)} files, {total / 2**20:.2f} MiB ({listed}); the limit is "
            f"{max_files} files, {max_bytes / 2**20:.2f} MiB. Nothing was written. Pack fewer runs "
            "(--variants/--seeds), or let the unfinished ones finish first"
        )


def _replace(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``; an older pack there is removed only once the new one is in place."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--pack {out}: is a file; choose an empty or new folder")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise PackError(f"--pack {out}: exists and is not a pack (no {MANIFEST}); choose an empty or new folder")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def read_manifest(pack_dir: Path) -> dict[str, Any]:
    path = Path(pack_dir) / MANIFEST
    if not path.is_file():
        raise PackError(f"--unpack {pack_dir}: no {MANIFEST} there (not a pack written by --pack)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise PackError(f"--unpack {pack_dir}: pack format {manifest.get('format')}, this code reads {FORMAT}")
    return manifest


def unpack(pack_dir: Path, root: Path, grid_name: str) -> dict[str, Any]:
    """Restore the pack's runs into ``root``; returns the manifest.

    Refuses (``PackError``, before writing anything) a pack of another grid, and a root that already holds
    any of the pack's runs; other folders in ``root`` are left as they are. The runs' recorded
    ``parent_ckpt`` is moved from the packed root's parent export to this root's, so the runs resume
    with the command ``compare`` builds for this root."""
    pack_dir, root = Path(pack_dir), Path(root)
    manifest = read_manifest(pack_dir)
    if manifest["grid"] != grid_name:
        raise PackError(f"--unpack {pack_dir}: a pack of grid {manifest['grid']!r}, not {grid_name!r}")
    packed = {name: entry for name, entry in manifest["runs"].items() if entry.get("file")}
    present = [name for name in packed if (root / name).exists() and any((root / name).iterdir())]
    if present:
        raise PackError(
            f"--unpack {pack_dir}: {root} already holds {', '.join(present)}; unpack into a fresh "
            "--root (or move those runs away)"
        )
    missing = sorted({e["file"] for e in packed.values()} - {p.name for p in pack_dir.iterdir()})
    if missing:
        raise PackError(f"--unpack {pack_dir}: the manifest names {', '.join(missing)}, which is not there")
    root.mkdir(parents=True, exist_ok=True)
    for file_name in sorted({e["file"] for e in packed.values()}):
        with tarfile.open(pack_dir / file_name, "r:gz") as tar:
            tar.extractall(root, filter="data")
    new_export = str(comparison.parent_dir(root) / "export" / "child")
    for name in packed:
        _move_parent_ckpt(root / name / CONFIG_FILE, manifest["parent_export"], new_export)
    return manifest


def _move_parent_ckpt(config_file: Path, old: str, new: str) -> None:
    if old == new or not config_file.is_file():
        return
    record = json.loads(config_file.read_text())
    if record.get("parent_ckpt") == old:
        record["parent_ckpt"] = new
        config_file.write_text(json.dumps(record, indent=2, default=str))


def describe(manifest: dict[str, Any]) -> str:
    """One line per packed file and a count of runs by status, for the command's output."""
    counts: dict[str, int] = {}
    for entry in manifest["runs"].values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    sizes = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in sorted(manifest["files"].items()))
    return (
        f"{sum(manifest['files'].values()) / 2**20:.2f} MiB in {len(manifest['files'])} files ({sizes}); "
        "runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    )
