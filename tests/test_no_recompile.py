"""The train and eval steps compile once per run: a retrace after the first step (a weak type, a dtype or a
sharding that differs between the initial or restored state and the step's own output) would recompile
every few steps and go unnoticed except in the wall clock. chex counts the traces."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

from hkt_jax.training import checkpoint, run, train
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.models import build_model, model_spec

TINY = [
    "child.depth=8",
    "data.source=synthetic",
    "data.synthetic_train_size=128",
    "data.synthetic_test_size=32",
    "data.validation_size=32",
    "train.batch_size=16",
    "train.log_every_steps=2",
    "train.eval_every_steps=3",
    "train.checkpoint_every_steps=2",
]


@pytest.fixture
def count_traces(monkeypatch):
    """Every train/eval step built in this test may be traced once (chex raises on the second trace)."""
    chex.clear_trace_counter()
    for name in ("make_train_step", "make_eval_step"):
        make = getattr(run, name)
        monkeypatch.setattr(run, name, lambda *a, _make=make, **k: chex.assert_max_traces(_make(*a, **k), n=1))


@pytest.mark.usefixtures("count_traces")
def test_steps_trace_once_in_a_run_and_after_a_resume(tmp_path):
    parent = tmp_path / "parent"
    spec = model_spec("cifar_resnet", depth=8, num_classes=10)
    checkpoint.save_model(parent, build_model(spec).init(jax.random.key(1), jnp.zeros((1, 32, 32, 3))), spec)
    base = apply_overrides(load_config("smoke"), [*TINY, f"parent_ckpt={parent}"])
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(apply_overrides(base, ["train.steps=5"]), workdir, allow_config_change=True)
    assert first["steps"] == 5
    chex.clear_trace_counter()  # chex counts per function code: the resumed run builds its own steps
    resumed = train.train_and_evaluate(apply_overrides(base, ["train.steps=9"]), workdir, allow_config_change=True)
    assert resumed["steps"] == 9  # steps 6-9 ran on the restored state without a second trace
