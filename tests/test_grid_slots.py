"""A grid in slots that end: K runs at once, a time budget that stops them cleanly, and the pack that carries the
grid to a fresh machine. The end-to-end test stops real runs (the toy task through the one loop), packs,
unpacks into a fresh root, finishes, and compares with the same runs never stopped."""

from __future__ import annotations

import json
import shutil
import tarfile

import jax
import numpy as np
import pytest

from experiments import compare
from hkt_jax.training import checkpoint
from hkt_jax.grids import comparison, pack as grid_pack, runs as grid_runs
from hkt_jax.grids.comparison import Grid
from hkt_jax.training.config import apply_overrides, load_config
from tests import signal_compare_experiment
from tests.signal_compare_experiment import ENV as SIGNAL_AT_ENV

SLOW = Grid(
    experiment="tests.fake_slow_experiment",
    config="unused",
    seeds=(0, 1),
    variants={"quick": ("sleep=0",), "slow": ("sleep=60",)},
)
TOY = Grid(
    experiment="tests.signal_compare_experiment",
    config="toy_segmentation",
    seeds=(0,),
    parent=(),
    variants={"hkt": ("method=hkt",)},
    metric="dice",
    metric_label="dice %",
)


def _use(monkeypatch, grid):
    monkeypatch.setattr(comparison, "load_grid", lambda name: grid)


def _events(root):
    return [line.split() for line in (root / "events.txt").read_text().splitlines()]


def _most_at_once(events):
    running, most = 0, 0
    for _, event, _, _ in sorted(events, key=lambda e: float(e[0])):
        running += 1 if event == "start" else -1
        most = max(most, running)
    return most


def test_the_time_budget_stops_running_runs_cleanly_and_a_rerun_finishes_them(tmp_path, monkeypatch, capsys):
    _use(monkeypatch, SLOW)
    root = tmp_path / "runs"
    # 6 s: the quick runs finish, the slow ones are stopped (SIGTERM, they save and exit 143).
    assert compare.main(["--grid", "slow", "--root", str(root), "--parallel", "2", "--time_budget", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "[2/4] slow seed 0: asked to stop (the time budget is spent)" in out
    assert "[2/4] slow seed 0: stopped" in out and "rerun the same command" in out
    for seed in (0, 1):
        assert comparison.run_status(comparison.run_dir(root, "quick", seed)) == "done"
        slow = comparison.run_dir(root, "slow", seed)
        assert comparison.run_status(slow) == "partial" and (slow / "checkpoint").exists()
        assert not (slow / comparison.FAILED_FILE).exists()  # stopped is not failed
    events = _events(root)
    assert _most_at_once(events) == 2
    assert {share for *_, share in events} == {"0.450"}  # 0.9 of one accelerator's memory, over 2 runs
    report = json.loads((root / "report.json").read_text())
    assert {row["variant"]: row["unfinished_seeds"] for row in report["table"]} == {"quick": [], "slow": [0, 1]}

    assert compare.main(["--grid", "slow", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[1/4] quick seed 0: done, reused" in out and "[2/4] slow seed 0: resuming" in out
    assert all(comparison.run_status(comparison.run_dir(root, v, s)) == "done" for v in SLOW.variants for s in (0, 1))
    assert [e[2] for e in _events(root)[len(events) :] if e[1] == "start"] == ["slow/seed0", "slow/seed1"]


def test_no_run_starts_once_the_budget_is_nearly_spent(tmp_path):
    directory = tmp_path / "never"
    runner = grid_runs.GridRunner(deadline=0.0, min_start_s=10.0, report=lambda line: None)
    outcome = runner.run([grid_runs.Job("[1/1] x seed 0", directory, ["false"])])
    assert outcome == {"[1/1] x seed 0": "not started"} and not directory.exists()
    with pytest.raises(ValueError, match="at least 1"):
        grid_runs.GridRunner(parallel=0)


def test_child_environment_shares_one_accelerator_and_keeps_user_settings():
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in grid_runs.child_environment(1, {})
    env = grid_runs.child_environment(4, {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


# -- pack / unpack ----------------------------------------------------------------------------------


def _fake_run(directory, *, done, steps=(), subdirs=()):
    directory.mkdir(parents=True)
    parent_export = str(directory.parent.parent / "parent" / "export" / "child")  # as run_command names it
    (directory / "config.json").write_text(json.dumps({"parent_ckpt": parent_export, "method": "hkt"}))
    (directory / "metrics.jsonl").write_text('{"step": 8, "loss": 1.0}\n')
    (directory / "run.log").write_text("log\n")
    if done:
        (directory / "summary.json").write_text('{"final_test_accuracy": 0.5}')
    for step in steps:
        (directory / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (directory / "checkpoints" / str(step) / "state" / "data").write_bytes(bytes(1000))
    for name in subdirs:
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "blob").write_bytes(b"x" * 100)


GRID = Grid(experiment="x", config="y", seeds=(0, 1), parent=(), variants={"a": (), "b": ()})


@pytest.fixture
def fake_root(tmp_path):
    base = tmp_path / "old"
    _fake_run(base / "parent", done=True, steps=(8, 16), subdirs=("export/child", "best"))
    _fake_run(base / "a" / "seed0", done=True, steps=(16,), subdirs=("export", "best", "tensorboard"))
    _fake_run(base / "b" / "seed0", done=False, steps=(8, 16), subdirs=("best", "tensorboard"))
    _fake_run(base / "a" / "seed1", done=False)  # started, no checkpoint yet
    return base


def test_pack_keeps_what_continuing_needs_and_no_more(fake_root, tmp_path):
    manifest = grid_pack.pack("g", GRID, fake_root, tmp_path / "pack", GRID.variants, GRID.seeds, commit="abc")
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == [
        "finished.tar.gz",
        "manifest.json",
        "parent.tar.gz",
        "unfinished.tar.gz",
    ]
    assert manifest["commit"] == "abc" and manifest["parent_export"] == str(fake_root / "parent" / "export" / "child")
    runs = manifest["runs"]
    assert runs["b/seed0"] == {
        "status": "partial",
        "checkpoint_step": 16,
        "file": "unfinished.tar.gz",
        "members": [
            "b/seed0/config.json",
            "b/seed0/metrics.jsonl",
            "b/seed0/run.log",
            "b/seed0/checkpoints/16",
            "b/seed0/best",
            "b/seed0/tensorboard",
        ],
    }
    assert runs["b/seed1"] == {"status": "pending", "checkpoint_step": None, "members": []}
    assert runs["a/seed1"]["file"] == "unfinished.tar.gz" and runs["a/seed1"]["checkpoint_step"] is None

    def names(file_name):
        with tarfile.open(tmp_path / "pack" / file_name) as tar:
            return {m.name for m in tar.getmembers() if m.isfile()}

    assert names("finished.tar.gz") == {
        "a/seed0/config.json",
        "a/seed0/metrics.jsonl",
        "a/seed0/run.log",
        "a/seed0/summary.json",
    }  # records only: no weights, no checkpoints
    assert "b/seed0/checkpoints/16/state/data" in names("unfinished.tar.gz")
    assert not any("checkpoints/8" in n for n in names("unfinished.tar.gz"))  # only the newest step
    assert names("parent.tar.gz") >= {"parent/export/child/blob", "parent/summary.json"}
    assert not any("checkpoints" in n or "best" in n for n in names("parent.tar.gz"))  # finished: export only
    assert manifest["files"] == {p.name: p.stat().st_size for p in (tmp_path / "pack").iterdir()}


def test_a_pack_over_the_limit_says_what_is_big_and_leaves_the_old_pack(fake_root, tmp_path):
    base, out = fake_root, tmp_path / "pack"
    grid_pack.pack("g", GRID, base, out, GRID.variants, GRID.seeds)
    before = (out / "manifest.json").read_text()
    with pytest.raises(grid_pack.PackError, match=r"unfinished\.tar\.gz .* MiB.*limit is 5 files, 0\.00 MiB"):
        grid_pack.pack("g", GRID, base, out, GRID.variants, GRID.seeds, max_bytes=100)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "pack"]  # no temporary folder left behind
    with pytest.raises(grid_pack.PackError, match="6 files"):
        grid_pack.check_limits({f"f{i}": 1 for i in range(6)})


def test_unpack_restores_the_runs_for_the_new_root_and_refuses_what_it_would_overwrite(fake_root, tmp_path):
    grid_pack.pack("g", GRID, fake_root, tmp_path / "pack", GRID.variants, GRID.seeds)
    with pytest.raises(grid_pack.PackError, match="grid 'g', not 'other'"):
        grid_pack.unpack(tmp_path / "pack", tmp_path / "new", "other")
    new = tmp_path / "new"
    grid_pack.unpack(tmp_path / "pack", new, "g")
    assert comparison.run_status(new / "a" / "seed0") == "done"
    assert comparison.run_status(new / "b" / "seed0") == "partial"
    assert grid_pack.newest_checkpoint_step(new / "b" / "seed0") == 16
    assert (new / "parent" / "export" / "child" / "blob").exists()
    # The runs now load the new root's parent export: the command compare builds for this root resumes them.
    for run in ("a/seed0", "b/seed0", "a/seed1"):
        assert json.loads((new / run / "config.json").read_text())["parent_ckpt"] == str(
            new / "parent" / "export" / "child"
        )
    with pytest.raises(grid_pack.PackError, match="already holds parent, a/seed0"):
        grid_pack.unpack(tmp_path / "pack", new, "g")
    with pytest.raises(grid_pack.PackError, match="no manifest.json"):
        grid_pack.unpack(tmp_path, tmp_path / "elsewhere", "g")


# -- end to end: stopped, packed, unpacked on a "fresh machine", finished == never stopped -----------------


def _rows(directory):
    return [{k: v for k, v in row.items() if k != "img_per_s"} for row in comparison.read_metrics(directory)]


def test_a_grid_stopped_packed_and_continued_elsewhere_ends_as_if_never_stopped(tmp_path, monkeypatch, capsys):
    _use(monkeypatch, TOY)
    first, fresh, straight = tmp_path / "slot1", tmp_path / "slot2", tmp_path / "straight"
    pack_dir = tmp_path / "pack"
    # Slot 1: the parent, then the run; at its step 8 the slot "ends" (SIGTERM to compare, which forwards it).
    monkeypatch.setenv(SIGNAL_AT_ENV, "hkt/seed0:8")
    code = compare.main(["--grid", "toy", "--root", str(first), "--parallel", "2", "--pack", str(pack_dir)])
    monkeypatch.delenv(SIGNAL_AT_ENV)
    out = capsys.readouterr().out
    assert code == 143, out  # stopped by SIGTERM, everything saved
    assert "[1/1] hkt seed 0: stopped at step 8" in out
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    assert manifest["runs"]["parent"]["status"] == "done"
    assert manifest["runs"]["hkt/seed0"]["status"] == "partial"
    assert manifest["runs"]["hkt/seed0"]["checkpoint_step"] == 8
    # The reference, never stopped, with the same parent (its training is deterministic; not trained again here).
    shutil.copytree(comparison.parent_dir(first), comparison.parent_dir(straight))
    # Slot 2, a fresh machine: only the pack comes along.
    shutil.rmtree(first)
    assert compare.main(["--grid", "toy", "--root", str(fresh), "--unpack", str(pack_dir)]) == 0
    assert "[1/1] hkt seed 0: resuming" in capsys.readouterr().out
    # The reference runs the very command compare gives the run, in this process: one fresh process fewer.
    assert signal_compare_experiment.main(comparison.run_command(TOY, straight, "hkt", 0)[3:]) == 0
    resumed, reference = comparison.run_dir(fresh, "hkt", 0), comparison.run_dir(straight, "hkt", 0)
    assert _rows(resumed) == _rows(reference) and len(_rows(resumed)) > 4
    a, b = (json.loads((d / "summary.json").read_text()) for d in (resumed, reference))
    for key in ("final_test_dice", "best_test_dice", "final_validation_dice", "best_step"):
        assert a[key] == b[key], key
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoint.load_model(resumed / "export" / "child")[0],
        checkpoint.load_model(reference / "export" / "child")[0],
    )


def test_smoke_grid_names_valid_overrides(capsys):
    grid = comparison.load_grid("smoke_grid")
    assert len(grid.variants) == 2 and len(grid.seeds) == 2 and grid.parent is not None
    for variant in grid.variants:
        config = apply_overrides(load_config(grid.config), [*grid.common, *grid.variants[variant]])
        assert config.train.steps == 16 and config.train.checkpoint_every_steps == 8
    assert compare.main(["--grid", "smoke_grid", "--root", "R", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and "method=parent" in lines[0] and "parent_ckpt=R/parent/export/child" in lines[1]
