"""``train.compute_dtype=bfloat16``: activations (child, frozen parent, Transfer adapters, GA inputs) in
bfloat16; parameters, gradients, optimizer state, BatchNorm statistics, losses and exports in float32.

Shapes and dtypes are read with ``jax.eval_shape`` (tracing only, no compilation), so every task's
model is checked cheaply; one tiny real step per task checks the numbers are finite."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.training import checkpoint, factories
from hkt_jax.engine import ga, hkt
from hkt_jax.training.config import ModelConfig, TrainSettings, apply_overrides, load_config
from hkt_jax.engine.hkt import HKTConfig
from hkt_jax.models import apply_stage, build_model
from hkt_jax.tasks import Classification, make_task
from hkt_jax.training.train import train_and_evaluate
from hkt_jax.training.run import initial_state, make_train_step

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _dtypes(tree) -> set[jnp.dtype]:
    return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)}


def _seg_task():
    return make_task("segmentation", load_config("seg_smoke"))


def _flow_task():
    return make_task("flow", load_config("flow_smoke"))


def _images(shape, scale=1.0):
    return np.random.default_rng(0).uniform(0, scale, shape).astype(np.float32)


# (name, child config, parent config, task, example batch): the three tasks' model pairs, tiny.
CASES = {
    "classification": (
        ModelConfig(depth=8),
        ModelConfig(depth=8, shortcut="B"),
        Classification,
        lambda: {"image": _images((2, 32, 32, 3)), "label": np.array([1, 2])},
    ),
    "segmentation": (
        ModelConfig(arch="pocketnet", width=4, depth=2),
        ModelConfig(arch="unet", widths=(8, 8)),
        _seg_task,
        lambda: {
            "image": _images((2, 16, 16, 1)),
            "mask": (_images((2, 16, 16)) > 0.7).astype(np.int32),
            "valid": np.ones((2,), np.float32),
        },
    ),
    "flow": (
        ModelConfig(arch="raft", small=True),
        ModelConfig(arch="raft", small=True),
        _flow_task,
        lambda: {
            "image1": _images((1, 64, 64, 3), 255),
            "image2": _images((1, 64, 64, 3), 255)[:, ::-1],
            "flow": np.ones((1, 64, 64, 2), np.float32),
            "valid": np.ones((1, 64, 64), np.float32),
        },
    ),
}
DATA_KWARGS = {
    "classification": {"num_classes": 10},
    "segmentation": {"num_classes": 3, "in_channels": 1},
    "flow": {"iters": 1},
}


def _pair(name: str, compute_dtype: str):
    child_cfg, parent_cfg, task_fn, batch_fn = CASES[name]
    child, _ = factories.make_model(child_cfg, DATA_KWARGS[name], conv_impl="xla", compute_dtype=compute_dtype)
    parent, _ = factories.make_model(parent_cfg, DATA_KWARGS[name], conv_impl="xla", compute_dtype=compute_dtype)
    return child, parent, task_fn(), batch_fn()


def test_compute_dtype_is_validated_and_recorded():
    with pytest.raises(ValueError, match="train.compute_dtype"):
        TrainSettings(compute_dtype="float16")
    with pytest.raises(ValueError, match="expected one of"):
        apply_overrides(load_config("smoke"), ["train.compute_dtype=half"])
    config = apply_overrides(load_config("smoke"), ["train.compute_dtype=bfloat16"])
    assert config.record()["train"]["compute_dtype"] == "bfloat16"
    assert load_config("smoke").train.compute_dtype == "float32"


def test_compute_dtype_is_a_build_setting_not_part_of_the_spec():
    _, spec32 = factories.make_model(ModelConfig(depth=8), {"num_classes": 10})
    model, spec16 = factories.make_model(ModelConfig(depth=8), {"num_classes": 10}, compute_dtype="bfloat16")
    assert spec32 == spec16 and "dtype" not in spec16["kwargs"]
    assert model.dtype == BF16 and build_model(spec16).dtype == F32  # a spec alone builds float32


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_activations_float32_parameters_statistics_and_outputs(name):
    """Every module output inside the network is bfloat16; what leaves it (logits, flows) is float32;
    parameters and the BatchNorm statistics a train step writes are float32."""
    child, _, task, batch = _pair(name, "bfloat16")
    x = task.model_input(batch)
    variables = jax.eval_shape(lambda: child.init(jax.random.key(0), x, train=False))
    assert _dtypes(variables) == {F32}
    out, state = jax.eval_shape(
        lambda v: child.apply(v, x, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"]),
        variables,
    )
    assert _dtypes(out) == {F32}
    assert _dtypes(state.get("batch_stats", {})) <= {F32}
    captured = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    inner = {
        jax.tree_util.keystr(path): jnp.dtype(a.dtype)
        for path, a in captured
        if jax.tree_util.keystr(path) != "['__call__'][0]"
    }
    assert len(inner) > 5 and set(inner.values()) == {BF16}, {k: v for k, v in inner.items() if v != BF16}
    for index in range(len(child.stage_names) - 1):  # the activations HKT mixes
        x, _ = jax.eval_shape(lambda v, z: apply_stage(child, v, index, z, train=False), variables, x)
        assert _dtypes(x) == {BF16}, (name, index)


@pytest.mark.parametrize("name", list(CASES))
def test_hkt_mixes_bfloat16_and_differentiates_into_float32(name, monkeypatch):
    """GA receives both streams in bfloat16 (the frozen parent and the Transfer adapters run in the
    compute dtype); the loss, the gradients and the optimizer state are float32."""
    child, parent, task, batch = _pair(name, "bfloat16")
    seen = []
    original = ga.etm_mix_with_diagnostic

    def spy(child_x, tau, **kwargs):
        seen.append((jnp.dtype(child_x.dtype), jnp.dtype(tau.dtype)))
        mixed, diagnostic = original(child_x, tau, **kwargs)
        assert mixed.dtype == child_x.dtype
        return mixed, diagnostic

    monkeypatch.setattr(hkt.ga, "etm_mix_with_diagnostic", spy)
    boundaries = factories.default_boundaries(child, None)
    engine = hkt.HKT(child, parent, HKTConfig(boundaries=boundaries), task=task)
    x = task.model_input(batch)
    parent_variables = jax.eval_shape(lambda: parent.init(jax.random.key(1), x, train=False))
    variables = jax.eval_shape(lambda p: engine.init(jax.random.key(0), x, p), parent_variables)
    assert _dtypes(variables) == {F32}
    tx = optax.adamw(1e-3)
    step = make_train_step(lambda *a: engine.loss(*a, train=True), tx, optax.constant_schedule(1e-3))
    state = jax.eval_shape(lambda v: initial_state(v, tx), variables)
    new_state, metrics = jax.eval_shape(step, state, parent_variables, batch)
    assert seen and set(seen) == {(BF16, BF16)}
    floats = {
        d
        for d in _dtypes((new_state.params, new_state.opt_state, new_state.batch_stats))
        if jnp.issubdtype(d, jnp.floating)
    }  # (adam's step count is an integer)
    assert floats == {F32}
    assert all(metrics[k].dtype == F32 for k in ("loss", "l1", "l2", "l3", "grad_norm"))


@pytest.mark.parametrize("name", list(CASES))
def test_a_bfloat16_train_step_is_finite(name):
    """One real plain-training step per task: finite, float32 parameters after the update, and (the small
    models; RAFT's compile is the suite's cost) a loss within bfloat16's reach of float32's."""
    losses = {}
    for compute_dtype in ("bfloat16", "float32") if name != "flow" else ("bfloat16",):
        child, _, task, batch = _pair(name, compute_dtype)
        x = task.model_input(batch)
        loss_fn, variables = factories.make_method("plain", child, task, x, jax.random.key(0))
        tx = optax.sgd(0.01)
        state = initial_state(variables, tx)
        state, metrics = jax.jit(make_train_step(loss_fn, tx, optax.constant_schedule(0.01)))(state, {}, batch)
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
        assert metrics["loss"].dtype == F32 and _dtypes(state.params) == {F32}
        assert _dtypes(state.batch_stats) <= {F32}
        losses[compute_dtype] = float(metrics["loss"])
    if "float32" in losses:
        assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03)


def test_bfloat16_run_exports_float32_and_records_the_dtype(tmp_path):
    """A bfloat16 run (CPU conv kernels requested: bfloat16 takes XLA's convolutions) exports a float32
    network whose spec has no dtype; it loads as a float32 parent."""
    config = apply_overrides(
        load_config("smoke"),
        [
            "method=parent",
            "parent.depth=8",
            "parent.conv_impl=cpu_kernel",
            "train.compute_dtype=bfloat16",
            "train.steps=4",
            "train.eval_every_steps=4",
            "train.checkpoint_every_steps=4",
            "train.batch_size=16",
            "data.synthetic_train_size=64",
            "data.synthetic_test_size=32",
            "data.validation_size=32",
        ],
    )
    summary = train_and_evaluate(config, tmp_path)
    assert np.isfinite(summary["final_test_accuracy"])
    variables, spec = checkpoint.load_model(tmp_path / "export" / "child")
    assert _dtypes(variables) == {F32}
    assert spec["metadata"]["compute_dtype"] == "bfloat16" and "dtype" not in spec["kwargs"]
    assert json.loads((tmp_path / "config.json").read_text())["train"]["compute_dtype"] == "bfloat16"
    parent, parent_variables, _ = factories.load_parent(tmp_path / "export" / "child", conv_impl="xla")
    logits = parent.apply(parent_variables, jnp.ones((1, 32, 32, 3)), train=False)
    assert parent.dtype == F32 and logits.dtype == F32 and np.isfinite(np.asarray(logits)).all()
