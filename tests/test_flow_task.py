"""Optical flow as a Task of the one training core: HKT on the RAFT pair (frozen parent, lambda = 0
equivalence, adapter shapes, 2 and 3 stages), the smoke job through ``experiment.run`` with exact
resume, RAFT's optimizer recipe against PyTorch, and evaluation of known flows on the shared samples."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.training import checkpoint, factories
from hkt_jax.training.config import HKTSettings, OptimConfig, apply_overrides, load_config
from hkt_jax.training.experiment import run
from hkt_jax.training.methods import plain_loss
from hkt_jax.models import RAFT
from hkt_jax.training.optim import make_schedule
from hkt_jax.tasks import Flow
from tests import tb_events
from tests.conftest import exported_leaves, require_shared

SIZE = 64  # RAFT's smallest frame (its correlation pyramid halves H/8 three times)


def _batch(seed=0, batch=1):
    rng = np.random.default_rng(seed)
    return {
        "image1": jnp.asarray(rng.uniform(0, 255, (batch, SIZE, SIZE, 3)), jnp.float32),
        "image2": jnp.asarray(rng.uniform(0, 255, (batch, SIZE, SIZE, 3)), jnp.float32),
        "flow": jnp.asarray(rng.normal(0, 3, (batch, SIZE, SIZE, 2)), jnp.float32),
        "valid": jnp.asarray(rng.uniform(size=(batch, SIZE, SIZE)) > 0.2, jnp.float32),
    }


@pytest.fixture(scope="module")
def pair():
    """RAFT parent (random weights) and RAFT-S child, one iteration each. The parent is initialised as one
    compiled program (``jit_init``; eagerly, each initialiser compiles on its own: most of this fixture's time)."""
    task = Flow()
    child, parent = RAFT(small=True, iters=1), RAFT(small=False, iters=1)
    example = task.model_input(_batch())
    parent_vars = factories.jit_init(functools.partial(parent.init, train=False))(jax.random.key(1), example)
    return task, child, parent, parent_vars, example


def _hkt(pair, **settings):
    task, child, parent, parent_vars, example = pair
    return factories.make_method(
        "hkt",
        child,
        task,
        example,
        jax.random.key(0),
        parent=parent,
        parent_variables=parent_vars,
        hkt=HKTSettings(inherit_loss="seq", **settings),
    )


def _adapter_shapes(variables):
    return {key: tuple(p["proj"]["kernel"].shape) for key, p in variables["params"]["adapters"].items() if p}


def _hkt_shapes(pair, **settings):
    """The initial variables' shapes alone: ``make_method`` traced under ``jax.eval_shape``, nothing compiled
    (its ``jit_init`` is a plain call there: compiler options belong to a top-level ``jax.jit`` only)."""
    with mock.patch.object(factories, "jit_init", lambda init_fn: init_fn):
        return jax.eval_shape(lambda: _hkt(pair, **settings)[1])


def test_transfer_adapters_bridge_the_raft_widths(pair):
    """3HKT: 256 <-> 128-ch features after `features`, 128 <-> 96 hidden and 128 <-> 64 context after `context`;
    2HKT: all four after the encoders, nothing after `features`."""
    three = _hkt_shapes(pair, stages=3)
    assert _adapter_shapes(three) == {
        "to_child_0_fmap1": (256, 128),
        "to_child_0_fmap2": (256, 128),
        "to_parent_0_fmap1": (128, 256),
        "to_parent_0_fmap2": (128, 256),
        "to_child_1_net": (128, 96),
        "to_child_1_inp": (128, 64),
        "to_parent_1_net": (96, 128),
        "to_parent_1_inp": (64, 128),
    }
    two = _hkt_shapes(pair, stages=2)
    assert _adapter_shapes(two) == {
        "to_child_1_fmap1": (256, 128),
        "to_child_1_fmap2": (256, 128),
        "to_child_1_net": (128, 96),
        "to_child_1_inp": (128, 64),
        "to_parent_1_fmap1": (128, 256),
        "to_parent_1_fmap2": (128, 256),
        "to_parent_1_net": (96, 128),
        "to_parent_1_inp": (64, 128),
    }
    with pytest.raises(ValueError, match="hkt.stages=4"):
        _hkt_shapes(pair, stages=4)


@pytest.fixture(scope="module")
def hkt3(pair):
    """3HKT's initial variables and its loss's value and gradients w.r.t. (params, parent variables) at
    (params, parent variables, batch): compiled once for the tests below (batches of one 64x64 pair)."""
    loss_fn, variables = _hkt(pair, stages=3)

    def loss(params, parent_variables, batch):
        return loss_fn(params, variables["batch_stats"], parent_variables, batch)

    return variables, jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def test_parent_is_frozen_but_head_inheritance_trains_the_child(pair, hkt3):
    task, child, parent, parent_vars, example = pair
    variables, value_and_grad = hkt3
    before = [np.array(x) for x in jax.tree.leaves(parent_vars)]
    (value, aux), (grads, parent_grads) = value_and_grad(variables["params"], parent_vars, _batch(2))
    assert np.isfinite(float(value)) and {"l1", "l2", "l3"} <= set(aux["metrics"])
    assert any(k.startswith("ga_ratio/to_child_1_net") for k in aux["metrics"])  # softmax GA over 8x8 tokens
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(parent_grads))
    assert float(jnp.max(jnp.abs(grads["adapters"]["to_parent_1_net"]["proj"]["kernel"]))) > 0  # via L3
    for a, b in zip(before, jax.tree.leaves(parent_vars)):
        np.testing.assert_array_equal(a, np.asarray(b))


def _translated_pair(shift=(3, 2), seed=0):
    """Frame 2 is frame 1 moved by ``shift`` = (x, y) pixels: one constant flow, learnable in a few steps."""
    dx, dy = shift
    frames = np.random.default_rng(seed).uniform(0, 255, (1, SIZE + dy, SIZE + dx, 3)).astype(np.float32)
    return {
        "image1": jnp.asarray(frames[:, :SIZE, :SIZE]),
        "image2": jnp.asarray(frames[:, dy:, dx:]),
        "flow": jnp.broadcast_to(jnp.asarray(shift, jnp.float32), (1, SIZE, SIZE, 2)),
        "valid": jnp.ones((1, SIZE, SIZE), jnp.float32),
    }


def test_hkt_steps_lower_the_loss_and_epe_on_a_fixed_pair(pair, hkt3):
    """Eight Adam steps (lr 5e-4) of 3HKT on one fixed translated pair: the loss and the child's EPE fall
    (measured: loss 2.65 -> 0.96, EPE 4.5 -> 0.7 px); a broken gradient path (adapters, GA, a stop_gradient
    in the wrong place) leaves them where they were."""
    task = pair[0]
    variables, value_and_grad = hkt3
    batch = _translated_pair()
    tx = optax.adam(5e-4)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = variables["params"]
    opt_state = jax.jit(tx.init)(params)
    epe = jax.jit(lambda outputs: task.train_metrics(outputs, batch)["epe"])
    losses, epes = [], []
    for step in range(9):
        (value, aux), (grads, _) = value_and_grad(params, pair[3], batch)
        losses.append(float(value))
        epes.append(float(epe(aux["outputs"])))
        if step < 8:
            params, opt_state = update(params, opt_state, grads)
    assert losses[-1] < 0.75 * losses[0], losses
    assert epes[-1] < 0.85 * epes[0], epes


@pytest.fixture(scope="module")
def plain_step(pair, hkt3):
    """Loss and gradients of one plain RAFT-S step (method=child) at the HKT init's child weights (3HKT's
    initial variables, ``hkt3``'s: one initialisation fewer to compile)."""
    task, child, parent, parent_vars, example = pair
    variables, _ = hkt3
    batch = _batch(3)
    plain = plain_loss(child, task)
    value, grads = jax.jit(jax.value_and_grad(lambda p: plain(p, variables["batch_stats"], {}, batch)[0]))(
        {"child": variables["params"]["child"]}
    )
    return batch, value, grads


@pytest.mark.parametrize("stages", [2, 3])
def test_lambda_zero_native_only_is_a_plain_child_step(pair, plain_step, stages):
    task, child, parent, parent_vars, example = pair
    loss_fn, variables = _hkt(pair, stages=stages, lam=0.0, alphas=(0.0, 1.0, 0.0))
    batch, plain_value, plain_grads = plain_step
    hkt_value, hkt_grads = jax.jit(
        jax.value_and_grad(lambda p: loss_fn(p, variables["batch_stats"], parent_vars, batch)[0])
    )(variables["params"])
    np.testing.assert_allclose(float(hkt_value), float(plain_value), rtol=1e-6)
    chex.assert_trees_all_close(hkt_grads["child"], plain_grads["child"], rtol=1e-4, atol=1e-6)


def test_one_cycle_adamw_and_clipping_follow_pytorch():
    """RAFT's recipe: torch OneCycleLR(pct_start=0.05, linear, over steps + 100) and AdamW + clip_grad_norm_."""
    torch = pytest.importorskip("torch")
    optim = OptimConfig(optimizer="adamw", learning_rate=4e-4, weight_decay=1e-4, schedule="one_cycle", clip_norm=1.0)
    steps = 300
    schedule = make_schedule(optim, 10, steps)
    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    reference_opt = torch.optim.AdamW([weight], lr=4e-4, weight_decay=1e-4, eps=1e-8)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        reference_opt, 4e-4, steps + 100, pct_start=0.05, cycle_momentum=False, anneal_strategy="linear"
    )
    expected = []
    for _ in range(steps):
        expected.append(reference.get_last_lr()[0])
        reference_opt.step()
        reference.step()
    np.testing.assert_allclose([float(schedule(s)) for s in range(steps)], expected, rtol=1e-5)

    tx, schedule = factories.make_optimization(optim, 10, steps)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    torch_w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    torch_opt = torch.optim.AdamW([torch_w], lr=4e-4, weight_decay=1e-4, eps=1e-8)
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(
        torch_opt, 4e-4, steps + 100, pct_start=0.05, cycle_momentum=False, anneal_strategy="linear"
    )
    for k in range(5):
        grad = np.array([3.0, -4.0, 12.0]) * (k + 1)  # norm 13(k+1) > 1: clipped
        updates, state = tx.update({"w": jnp.asarray(grad, jnp.float32)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        torch_w.grad = torch.tensor(grad)
        torch.nn.utils.clip_grad_norm_([torch_w], 1.0)
        torch_opt.step()
        torch_sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), torch_w.detach().numpy(), rtol=1e-5)


# -- the smoke job through experiment.run ------------------------------------------------------------


def _smoke(*overrides):
    """``flow_smoke`` cut to what these tests read: 2 steps of batch 4 (the 4 rows TensorBoard shows), one
    refinement iteration (half the unrolled update blocks to compile; still not the default 12, so the
    exported spec shows ``data.iters`` reached the model)."""
    return apply_overrides(
        load_config("flow_smoke"),
        [
            "train.steps=2",
            "train.eval_every_steps=2",
            "train.checkpoint_every_steps=2",
            "train.batch_size=4",
            "data.iters=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flow_smoke")
    return workdir, run(_smoke(), workdir)


def test_smoke_trains_parent_then_hkt_child(smoke_run):
    workdir, summary = smoke_run
    parent_summary = json.loads((workdir / "parent" / "summary.json").read_text())
    assert parent_summary["task"] == "flow" and parent_summary["method"] == "parent"
    assert summary["method"] == "hkt" and summary["best_step"] == 2
    assert np.isfinite(summary["final_test_epe"]) and {"1px", "3px", "5px", "f1"} <= set(summary["final_test"])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "l1", "l2", "l3", "epe"} <= set(rows[0]) and any("eval_epe" in r for r in rows)
    _, spec = checkpoint.load_model(workdir / "export" / "child")
    assert spec["arch"] == "raft" and spec["kwargs"] == {"small": True, "iters": 1}
    shown = tb_events.images(workdir)["frame1_gt_prediction"]  # TensorBoard: frame | truth | prediction
    assert list(shown) == [2] and shown[2].shape == (4 * 64, 3 * 64, 3)


def test_smoke_resume_continues_exactly(tmp_path):
    """Rerunning a 2-step run to 3 steps ends bit-identical to 3 straight steps (constant schedule; method=child
    keeps it cheap: the flow pipeline, optimizer and loop state are what resume, the same for every method)."""
    straight = run(_smoke("method=child", "train.steps=3"), tmp_path / "straight")
    run(_smoke("method=child"), tmp_path / "resumed")
    resumed = run(_smoke("method=child", "train.steps=3"), tmp_path / "resumed")
    assert straight["final_test_epe"] == resumed["final_test_epe"]
    for a, b in zip(
        exported_leaves(tmp_path / "straight" / "export" / "child"),
        exported_leaves(tmp_path / "resumed" / "export" / "child"),
    ):
        np.testing.assert_array_equal(a, b)


# -- evaluation of known flows on the shared samples ------------------------------------------------


def _read_flo(path: Path) -> np.ndarray:
    """Middlebury .flo with NumPy alone (magic, width, height, then (H, W, 2) float32)."""
    raw = path.read_bytes()
    width, height = np.frombuffer(raw[4:12], "<i4")
    return np.frombuffer(raw[12:], "<f4").reshape(height, width, 2).astype(np.float64)


@pytest.mark.parametrize("folder", ["flyingchairs", "sintel-alley1"])
def test_evaluating_zero_and_exact_flows_gives_the_expected_numbers(folder):
    from experiments.evaluate_flow import evaluate_source
    from hkt_jax.data.flow_datasets import flow_folder

    root = require_shared("flow", folder)
    source = flow_folder(root)
    flows = [_read_flo(p) for p in sorted(root.glob("*.flo"))]
    magnitudes = np.concatenate([np.linalg.norm(f, axis=-1).ravel() for f in flows])

    zero = evaluate_source(lambda b: np.zeros_like(b["flow"]), source)
    assert zero["pairs"] == len(flows)
    np.testing.assert_allclose(zero["epe"], magnitudes.mean(), rtol=1e-5)
    np.testing.assert_allclose(zero["1px"], np.mean(magnitudes < 1), rtol=1e-6)
    np.testing.assert_allclose(zero["f1"], 100 * np.mean(magnitudes > 3), rtol=1e-6)  # > 3 px and > 5 % of |gt|
    per_image = np.mean([np.linalg.norm(f, axis=-1).mean() for f in flows])
    np.testing.assert_allclose(
        evaluate_source(lambda b: np.zeros_like(b["flow"]), source, per_image_epe=True)["epe"], per_image, rtol=1e-5
    )

    exact = evaluate_source(lambda b: b["flow"], source, pad_mode="kitti")
    assert exact["epe"] == 0.0 and exact["1px"] == 1.0 and exact["f1"] == 0.0


def test_kd_mixes_ground_truth_and_parent_flow_losses():
    """DRAFT-style KD: (1 - w) * sequence loss vs gt + w * sequence loss vs the parent's final flow (float64 NumPy)."""
    rng = np.random.default_rng(5)
    student = rng.normal(0, 2, (3, 2, 8, 8, 2)).astype(np.float32)
    teacher = rng.normal(0, 2, (2, 2, 8, 8, 2)).astype(np.float32)
    batch = {
        "flow": rng.normal(0, 2, (2, 8, 8, 2)).astype(np.float32),
        "valid": (rng.uniform(size=(2, 8, 8)) > 0.3).astype(np.float32),
    }

    def reference(target, valid):
        weights = 0.8 ** np.arange(2, -1, -1)
        errors = np.abs(student.astype(np.float64) - target) * valid[..., None]
        return float(np.sum(weights * errors.mean(axis=(1, 2, 3, 4))))

    loss, terms = Flow().distill_loss(jnp.asarray(student), jnp.asarray(teacher), batch, temperature=4.0, weight=0.3)
    gt, kd = reference(batch["flow"], batch["valid"]), reference(teacher[-1], np.ones((2, 8, 8)))
    np.testing.assert_allclose(
        [float(terms["l2"]), float(terms["l3"]), float(loss)], [gt, kd, 0.7 * gt + 0.3 * kd], rtol=1e-5
    )
