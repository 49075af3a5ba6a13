"""The whole training program on synthetic data: outputs, exact resume after SIGKILL, frozen parent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hkt_jax.training import checkpoint
from hkt_jax.models import build_model, model_spec
from tests.conftest import REPO_ROOT

TINY = [
    "child.depth=8",
    "parent.depth=8",
    "data.source=synthetic",
    "data.synthetic_train_size=256",
    "data.synthetic_test_size=64",
    "data.validation_size=64",
    "train.batch_size=16",
    "train.steps=12",
    "train.log_every_steps=2",
    "train.eval_every_steps=6",
    "train.checkpoint_every_steps=4",
]


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("parent")
    spec = model_spec("cifar_resnet", depth=8, num_classes=10)
    variables = build_model(spec).init(jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
    checkpoint.save_model(directory, variables, spec)
    return directory


def _cli(workdir, *overrides, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "experiments.cifar_hkt",
        "--config",
        "smoke",
        "--workdir",
        str(workdir),
        *TINY,
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if wait:
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _train_rows(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, parent_dir):
    workdir = tmp_path_factory.mktemp("straight")
    before = _tree_hash(parent_dir)
    result = _cli(workdir, f"parent_ckpt={parent_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree_hash(parent_dir) == before, "the HKT run modified the parent checkpoint"
    (workdir / "stdout.txt").write_text(result.stdout)
    return workdir


def test_run_says_what_it_uses_at_start_up(uninterrupted, parent_dir):
    """The CLI prints one block before training: method, models with parameter counts, parent origin,
    data, mesh, conv implementation, steps and checkpoint policy."""
    out = (uninterrupted / "stdout.txt").read_text()
    block = out[out.index("hkt_jax: method=hkt task=classification") :]
    for expected in (
        "child:  cifar_resnet(",
        "75,290 parameters",
        f"frozen, from {parent_dir}",
        "origin not recorded",
        "data:   synthetic cifar10: 10 classes, 32x32x3 images: 192 train",
        "mesh:   1 x cpu",
        "conv_impl=",
        "steps:  12",
        "starting at step 0",
        "every 4 steps",
    ):
        assert expected in block, (expected, block)


def test_run_writes_every_output(uninterrupted):
    rows = _train_rows(uninterrupted)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    for row in train_rows:
        assert {"loss", "l1", "l2", "l3", "lr", "accuracy"} <= set(row)
        assert np.isfinite(row["loss"])
    assert [r["step"] for r in eval_rows] == [6, 12]
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())[-1] == 12
    summary = json.loads((uninterrupted / "summary.json").read_text())
    for key in (
        "final_validation_accuracy",
        "best_validation_accuracy",
        "final_test_accuracy",
        "best_test_accuracy",
        "parameters",
        "inference_ms_per_image",
    ):
        assert summary[key] is not None, key
    # ResNet-8 (option A): stem 464 + groups 4,672 + 13,952 + 55,552 + fc 650.
    assert summary["parameters"] == 75_290


def test_exported_child_runs_alone(uninterrupted):
    """The export is the trained state's child alone: on the same images it gives the logits of the child in
    the last training checkpoint (the state the run ended with), not those of an earlier one."""
    variables, spec = checkpoint.load_model(uninterrupted / "export" / "child")
    assert set(variables) == {"params", "batch_stats"}
    assert "adapters" not in json.dumps(jax.tree.map(lambda x: None, variables))
    model = build_model(spec)
    images = jax.random.normal(jax.random.key(7), (3, 32, 32, 3))
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (3, 10) and bool(jnp.all(jnp.isfinite(logits)))

    def child_logits(step):
        with ocp.StandardCheckpointer() as reader:
            state = reader.restore(uninterrupted / "checkpoints" / str(step) / "state")
        assert int(state["step"]) == step
        child = {"params": state["params"]["child"], "batch_stats": state["batch_stats"]["child"]}
        return model.apply(child, images, train=False)

    np.testing.assert_allclose(logits, child_logits(12), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(logits - child_logits(8))) > 1e-4


def test_sigkill_then_resume_is_bit_identical(uninterrupted, parent_dir, tmp_path):
    workdir = tmp_path / "killed"
    process = _cli(workdir, f"parent_ckpt={parent_dir}", wait=False)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (workdir / "summary.json").exists()

    result = _cli(workdir, f"parent_ckpt={parent_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, _ = checkpoint.load_model(workdir / "export" / "child")
    straight, _ = checkpoint.load_model(uninterrupted / "export" / "child")
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    assert _train_rows(workdir) == _train_rows(uninterrupted)


def test_bad_override_is_a_clear_cli_error(tmp_path):
    result = _cli(tmp_path, "train.stepz=3")
    assert result.returncode == 2
    assert "unknown key 'train.stepz'" in result.stderr
