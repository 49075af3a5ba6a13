"""A real PyTorch ResNet-56, converted by the CLI, is the parent of an HKT smoke run."""

from __future__ import annotations

import hashlib
import json

import pytest

from experiments.configs import smoke
from hkt_jax.convert.__main__ import main as convert
from hkt_jax.training.config import apply_overrides
from hkt_jax.training.train import train_and_evaluate
from tests.conftest import require_shared

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs


def _digest(directory):
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_converted_resnet56_parents_an_hkt_run(tmp_path, capsys):
    pytest.importorskip("torch", reason="the converter reads PyTorch checkpoints")
    source = require_shared("resnet-cifar10-torch", "resnet56-4bfd9763.th")
    parent_dir = tmp_path / "resnet56"
    # The CLI's own entry point, in this process: a subprocess would import JAX and torch a second time.
    assert convert(["resnet", "--src", str(source), "--depth", "56", "--out", str(parent_dir)]) == 0, (
        capsys.readouterr().err
    )
    capsys.readouterr()
    before = _digest(parent_dir)

    overrides = [
        f"parent_ckpt={parent_dir}",
        "train.steps=4",
        "train.log_every_steps=2",
        "train.eval_every_steps=4",
        "train.checkpoint_every_steps=4",
        "data.synthetic_train_size=128",
        "data.validation_size=32",
        "data.synthetic_test_size=32",
        "train.batch_size=16",
    ]
    with pytest.warns(UserWarning, match="parent was trained on real .* cifar10 data but this run uses synthetic"):
        summary = train_and_evaluate(apply_overrides(smoke.get_config(), overrides), tmp_path / "run")
    assert summary["steps"] == 4
    assert "converted from" in capsys.readouterr().out  # the start-up block says where the parent came from
    # The same run with head inheritance off: the ResNet-56 head then sees only its own features, so L3
    # must differ from the run above where it sees the child's.
    with pytest.warns(UserWarning):
        train_and_evaluate(apply_overrides(smoke.get_config(), [*overrides, "hkt.head=false"]), tmp_path / "no_head")
    l3 = {
        name: [
            json.loads(line)["l3"]
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            if '"l3"' in line
        ]
        for name in ("run", "no_head")
    }
    assert len(l3["run"]) == len(l3["no_head"]) == 2
    assert abs(l3["run"][0] - l3["no_head"][0]) > 1e-4, l3
    assert _digest(parent_dir) == before
