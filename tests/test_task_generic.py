"""The training core is not classification's: a toy per-pixel Task through the unchanged
``train_and_evaluate`` — parent then HKT child, best model by its own metric, exact resume, 1 vs 8 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import cifar_hkt
from hkt_jax.training import checkpoint
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run
from tests.conftest import REPO_ROOT, exported_leaves


def _config(*overrides):
    return apply_overrides(load_config("toy_segmentation"), list(overrides))


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hkt_run(tmp_path_factory):
    """Parent trained first (``workdir/parent``), then the HKT child: the bare experiment job."""
    workdir = tmp_path_factory.mktemp("toy_seg")
    summary = run(_config(), workdir)
    return workdir, summary


def test_parent_then_hkt_child_on_a_per_pixel_task(hkt_run):
    workdir, summary = hkt_run
    parent_summary = json.loads((workdir / "parent" / "summary.json").read_text())
    assert parent_summary["task"] == "toy_segmentation" and parent_summary["final_test_dice"] > 0.5
    train_rows = [r for r in _rows(workdir) if "loss" in r]
    assert {"l1", "l2", "l3", "pixel_accuracy"} <= set(train_rows[-1])
    assert any(k.startswith("ga_ratio/") for k in train_rows[-1])  # softmax GA over pixel tokens
    assert train_rows[-1]["l2"] < train_rows[0]["l2"]  # the child learns
    eval_rows = [r for r in _rows(workdir) if "eval_dice" in r]
    assert [r["step"] for r in eval_rows] == [8, 16]
    best = max(eval_rows, key=lambda r: r["eval_dice"])
    assert summary["best_validation_dice"] == pytest.approx(best["eval_dice"])
    assert summary["best_step"] == best["step"]
    assert {"final_test_dice", "best_test_dice", "final_validation_dice"} <= set(summary)
    # The export is the child alone (widths 4/8), loadable without the parent.
    _, spec = checkpoint.load_model(workdir / "export" / "child")
    assert spec["arch"] == "toy" and spec["kwargs"]["widths"] == [4, 8]
    adapters = json.loads((workdir / "config.json").read_text())
    assert adapters["task"] == "toy_segmentation" and "depth" not in adapters["child"]


def test_resume_continues_exactly(tmp_path, hkt_run):
    """Stopping after 4 steps and rerunning to 8 ends where 8 straight steps end (constant schedule)."""
    parent = str(hkt_run[0] / "parent" / "export" / "child")
    short = ("train.eval_every_steps=4", "train.checkpoint_every_steps=4")
    straight = run(_config(f"parent_ckpt={parent}", "train.steps=8", *short), tmp_path / "straight")
    run(_config(f"parent_ckpt={parent}", "train.steps=4", *short), tmp_path / "resumed")
    resumed = run(_config(f"parent_ckpt={parent}", "train.steps=8", *short), tmp_path / "resumed")
    assert straight["final_test_dice"] == resumed["final_test_dice"]
    for a, b in zip(
        exported_leaves(tmp_path / "straight" / "export" / "child"),
        exported_leaves(tmp_path / "resumed" / "export" / "child"),
    ):
        np.testing.assert_array_equal(a, b)


def _cli_args(workdir, parent):
    return [
        "--config",
        "toy_segmentation",
        "--workdir",
        str(workdir),
        f"parent_ckpt={parent}",
        "train.steps=4",
        "train.log_every_steps=1",
        "train.eval_every_steps=4",
    ]


def _losses(workdir):
    return [r["loss"] for r in _rows(workdir) if "loss" in r]


def test_one_and_eight_devices_agree(tmp_path, hkt_run, capsys):
    """Global-batch semantics hold for this task too: the same losses on 1 and 8 (simulated) devices.

    The one-device run is the entry point in this process (which has one CPU device); eight simulated
    devices need a fresh process, as the flag is read when JAX starts."""
    parent = hkt_run[0] / "parent" / "export" / "child"
    assert cifar_hkt.main(_cli_args(tmp_path / "one", parent)) == 0
    assert "mesh:   1 x cpu" in capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cmd = [sys.executable, "-m", "experiments.cifar_hkt", *_cli_args(tmp_path / "eight", parent)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh:   8 x cpu" in result.stdout
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(one) == 4
    np.testing.assert_allclose(eight, one, rtol=2e-5)
