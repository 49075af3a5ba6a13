"""The n-stage HKT engine: stream wiring, frozen parent, loss, and that it learns."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

from hkt_jax.engine import ga
from hkt_jax.engine.hkt import (
    HKT,
    Boundary,
    HKTConfig,
    validate_alphas,
)
from hkt_jax.training.methods import hkt_loss, plain_loss
from hkt_jax.tasks import Classification
from hkt_jax.tasks.classification import classification_ce, classification_mae
from hkt_jax.models import ToyStagedNet, apply_stage
from hkt_jax.training.run import TrainState, make_train_step

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

CHILD = ToyStagedNet(widths=(4, 6), strides=(2, 1), num_classes=3)  # half the parent's resolution
PARENT = ToyStagedNet(widths=(8, 12), strides=(1, 1), num_classes=3)


def _data(seed=0, batch=16, size=8):
    """A learnable task: the label is which third of the image is brightest."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    label = rng.integers(0, 3, size=batch)
    for i, k in enumerate(label):
        x[i, :, k * size // 3 : (k + 1) * size // 3] += 1.5
    return {"image": jnp.asarray(x), "label": jnp.asarray(label, jnp.int32)}


@pytest.fixture(scope="module")
def parent_variables():
    return jax.jit(PARENT.init)(jax.random.key(1), _data()["image"])  # one program, not one per operation


def _state(variables, tx):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
    )


def test_streams_follow_algorithm_1(parent_variables):
    """Rebuild Algorithm 1 by hand from the public pieces and compare the three outputs."""
    engine = HKT(CHILD, PARENT, HKTConfig(lam=0.6, mode="softmax"), task=Classification())
    x = _data()["image"]
    variables = jax.jit(engine.init)(jax.random.key(2), x, parent_variables)
    outputs, _, metrics = jax.jit(functools.partial(engine.forward, train=False))(variables, parent_variables, x)

    child_vars = {"params": variables["params"]["child"], "batch_stats": variables["batch_stats"]["child"]}
    adapters = variables["params"]["adapters"]

    def tau(key, z, like):
        c = z @ adapters[key]["proj"]["kernel"] + adapters[key]["proj"]["bias"]
        if c.shape[1:-1] != like.shape[1:-1]:
            c = jax.image.resize(c, (c.shape[0], *like.shape[1:-1], c.shape[-1]), "linear", antialias=False)
        return c

    def stage(model, v, i, h):
        return apply_stage(model, v, i, h, train=False)[0]

    @jax.jit  # the hand-built streams as one program: eager, each operation would compile on its own
    def by_hand(x):
        native = x
        for i in range(3):
            native = stage(CHILD, child_vars, i, native)
        zc, zp = stage(CHILD, child_vars, 0, x), stage(PARENT, parent_variables, 0, x)
        for i in range(2):
            phi_c = zc + 0.6 * ga.genetic_attention(zc, tau(f"to_child_{i}", zp, zc), mode="softmax")
            phi_p = zp + 0.6 * ga.genetic_attention(zp, tau(f"to_parent_{i}", zc, zp), mode="softmax")
            zc, zp = stage(CHILD, child_vars, i + 1, phi_c), stage(PARENT, parent_variables, i + 1, phi_p)
        return native, zc, zp

    native, zc, zp = by_hand(x)

    np.testing.assert_allclose(outputs["native"], native, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["backbone"], zc, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outputs["head"], zp, rtol=1e-4, atol=1e-5)
    assert set(metrics) == {f"ga_ratio/{d}_{i}" for d in ("to_child", "to_parent") for i in range(2)}


def test_parent_frozen_child_trains_and_head_inheritance_reaches_child(parent_variables):
    batch = _data()
    engine = HKT(CHILD, PARENT, HKTConfig(lam=0.6, alphas=(0.25, 0.5, 0.25)), task=Classification())
    variables = jax.jit(engine.init)(jax.random.key(3), batch["image"], parent_variables)
    loss_fn = hkt_loss(engine)

    # The parent's gradient is exactly zero, even when asked for explicitly.
    parent_grad = jax.jit(jax.grad(lambda pv: loss_fn(variables["params"], variables["batch_stats"], pv, batch)[0]))(
        parent_variables
    )
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(parent_grad))

    # L3 alone reaches the child through the parent's later stages.
    def l3(params):
        return engine.loss(params, variables["batch_stats"], parent_variables, batch)[1]["metrics"]["l3"]

    l3_grad = jax.jit(jax.grad(l3))(variables["params"])
    child_norm = optax.tree.norm(l3_grad["child"])
    assert float(child_norm) > 1e-6
    assert float(optax.tree.norm(l3_grad["adapters"])) > 1e-6

    before = jax.tree.map(np.array, parent_variables)
    tx = optax.sgd(0.1, momentum=0.9)
    step = jax.jit(make_train_step(loss_fn, tx, optax.constant_schedule(0.1)), donate_argnums=(0,))
    state = _state(variables, tx)
    start_child = jax.tree.map(np.array, variables["params"]["child"])
    for _ in range(3):
        state, _ = step(state, parent_variables, batch)
    chex.assert_trees_all_equal(before, jax.device_get(parent_variables))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), start_child, state.params["child"])
    assert all(jax.tree.leaves(changed))


def test_lambda_zero_native_only_equals_plain_child_step(parent_variables):
    batch = _data(seed=4)
    engine = HKT(CHILD, PARENT, HKTConfig(lam=0.0, alphas=(0.0, 1.0, 0.0)), task=Classification())
    variables = jax.jit(engine.init)(jax.random.key(5), batch["image"], parent_variables)
    tx = optax.sgd(0.05, momentum=0.9)
    schedule = optax.constant_schedule(0.05)

    hkt_state, hkt_metrics = jax.jit(make_train_step(hkt_loss(engine), tx, schedule))(
        _state(variables, tx), parent_variables, batch
    )
    plain_vars = {"params": {"child": variables["params"]["child"]}, "batch_stats": variables["batch_stats"]}
    plain_state, plain_metrics = jax.jit(make_train_step(plain_loss(CHILD, Classification()), tx, schedule))(
        _state(plain_vars, tx), {}, batch
    )
    np.testing.assert_allclose(hkt_metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        (hkt_state.params["child"], hkt_state.batch_stats),
        (plain_state.params["child"], plain_state.batch_stats),
    )


def test_toy_pair_with_different_widths_and_resolutions_learns(parent_variables):
    engine = HKT(CHILD, PARENT, HKTConfig(lam=0.6, alphas=(0.25, 0.5, 0.25), inherit_loss="mae"), task=Classification())
    batch = _data(seed=6, batch=32)
    variables = jax.jit(engine.init)(jax.random.key(7), batch["image"], parent_variables)
    kernels = {k: v["proj"]["kernel"].shape for k, v in variables["params"]["adapters"].items()}
    assert kernels == {"to_child_0": (8, 4), "to_parent_0": (4, 8), "to_child_1": (12, 6), "to_parent_1": (6, 12)}
    tx = optax.adam(1e-2)
    step = jax.jit(make_train_step(hkt_loss(engine), tx, optax.constant_schedule(1e-2)))
    state = _state(variables, tx)
    losses = []
    for i in range(60):
        state, metrics = step(state, parent_variables, _data(seed=100 + i, batch=32))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, state.params["adapters"], variables["params"]["adapters"]))
    assert float(moved) > 1e-3


def test_boundary_switches(parent_variables):
    """Backbone off everywhere: the backbone stream is the native one; head off: the plain parent."""
    x = _data()["image"]
    off = HKTConfig(boundaries=(Boundary(backbone=False, head=False),) * 2)
    engine = HKT(CHILD, PARENT, off, task=Classification())
    variables = jax.jit(engine.init)(jax.random.key(8), x, parent_variables)
    assert variables["params"]["adapters"] == {}
    outputs, _, metrics = jax.jit(functools.partial(engine.forward, train=False))(variables, parent_variables, x)
    np.testing.assert_array_equal(outputs["backbone"], outputs["native"])
    np.testing.assert_allclose(outputs["head"], jax.jit(PARENT.apply)(parent_variables, x), rtol=1e-6)
    assert metrics == {}

    only_last = HKTConfig(boundaries=(Boundary(backbone=False, head=False), Boundary(backbone=True, head=False)))
    variables = jax.eval_shape(
        HKT(CHILD, PARENT, only_last, task=Classification()).init, jax.random.key(9), x, parent_variables
    )
    assert sorted(variables["params"]["adapters"]) == ["to_child_1"]


def test_classification_losses_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4))
    labels = rng.integers(0, 4, size=5)
    batch = {"label": jnp.asarray(labels)}
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(
        classification_mae(jnp.asarray(logits, jnp.float32), batch), np.abs(probs - onehot).mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        classification_ce(jnp.asarray(logits, jnp.float32), batch),
        -np.log(probs[np.arange(5), labels]).mean(),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "alphas, match",
    [
        ((0.5, 0.25, 0.25), r"max\(a1, a3\) <= a2"),
        ((0.2, 0.5, 0.2), "sum to 1"),
        ((-0.1, 0.6, 0.5), r"\[0, 1\]"),
        ((0.5, 0.5), "three weights"),
    ],
)
def test_bad_alphas_are_config_errors(alphas, match):
    with pytest.raises(ValueError, match=match):
        validate_alphas(alphas)
    if len(alphas) == 3:
        with pytest.raises(ValueError, match="alphas"):
            HKT(CHILD, PARENT, HKTConfig(alphas=alphas), task=Classification())


def test_bad_engine_configs():
    with pytest.raises(ValueError, match="lam"):
        HKT(CHILD, PARENT, HKTConfig(lam=1.5), task=Classification())
    with pytest.raises(ValueError, match="inherit_loss"):
        HKT(CHILD, PARENT, HKTConfig(inherit_loss="mse"), task=Classification())
    with pytest.raises(ValueError, match="2 boundaries"):
        HKT(CHILD, PARENT, HKTConfig(boundaries=(Boundary(),)), task=Classification())
    with pytest.raises(TypeError, match="staged model"):
        HKT(CHILD, object(), HKTConfig(), task=Classification())


class Squash(nn.Module):
    """A staged model whose first stage hands on one number per example: no features to mix."""

    stage_names = ("squash", "head")

    def setup(self):
        self.dense = nn.Dense(3)

    def stage(self, index, x, *, train=False):
        return x.mean(axis=(1, 2, 3)) if index == 0 else self.dense(x[:, None])

    def __call__(self, x, train=False):
        return self.stage(1, self.stage(0, x, train=train), train=train)


def test_boundary_inputs_of_the_wrong_rank_name_the_boundary():
    x = _data()["image"]
    parent_vars = Squash().init(jax.random.key(1), x)
    engine = HKT(Squash(), Squash(), HKTConfig(inherit_loss="ce"), task=Classification())
    with pytest.raises(
        AssertionError, match=r"HKT boundary 0 \(after stage 'squash'\), to_child.*\(B, \[\*spatial,\] C\)"
    ):
        engine.init(jax.random.key(0), x, parent_vars)
