"""``hkt.head_anchor``: Eq. 7's head mixing (anchored on the parent) vs the released code's (on the child).

On the paper's 2HKT split (pooled 64-d vectors, gate GA) the gate sits near 1 (measured 0.92-0.99 in
training; ~1 at initialisation). Anchored on the parent, phi = p + lam (1 - a)(c - p) ~= p: the parent's
head sees its own features and L3 sends the child almost no gradient. Anchored on the child (released
code), phi = c + lam (1 - a)(p - c) ~= c: the parent's head sees the child's features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.engine.hkt import HKT, HKTConfig
from hkt_jax.models import CifarResNet, apply_stage
from hkt_jax.tasks import Classification

CHILD = CifarResNet(depth=8, conv_impl="xla")
PARENT = CifarResNet(depth=8, conv_impl="xla")
LAM = 0.6


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }
    parent_variables = jax.jit(PARENT.init)(jax.random.key(1), batch["image"])
    return batch, parent_variables


def _engine(anchor):
    return HKT(
        CHILD, PARENT, HKTConfig(lam=LAM, mode="gate", head_anchor=anchor, inherit_loss="ce"), task=Classification()
    )


def _head_numpy(variables, parent_variables, x, anchor):
    """The head stream rebuilt from the stages and the gate formula in float64."""
    child_vars = {"params": variables["params"]["child"], "batch_stats": variables["batch_stats"]["child"]}
    c = np.asarray(apply_stage(CHILD, child_vars, 0, x, train=False)[0], np.float64)
    p = np.asarray(apply_stage(PARENT, parent_variables, 0, x, train=False)[0], np.float64)
    a = 1.0 / (1.0 + np.exp(-(c * p).sum(-1, keepdims=True) / np.sqrt(c.shape[-1])))
    phi = p + LAM * (1 - a) * (c - p) if anchor == "parent" else c + LAM * (1 - a) * (p - c)
    head = apply_stage(PARENT, parent_variables, 1, jnp.asarray(phi, jnp.float32), train=False)[0]
    own = apply_stage(PARENT, parent_variables, 1, jnp.asarray(p, jnp.float32), train=False)[0]
    through_parent_head = apply_stage(PARENT, parent_variables, 1, jnp.asarray(c, jnp.float32), train=False)[0]
    return np.asarray(head), np.asarray(own), np.asarray(through_parent_head), a


@pytest.mark.parametrize("anchor", ["parent", "child"])
def test_head_stream_follows_its_anchor(setup, anchor):
    batch, parent_variables = setup
    engine = _engine(anchor)
    variables = jax.jit(engine.init)(jax.random.key(0), batch["image"], parent_variables)
    outputs, _, metrics = engine.forward(variables, parent_variables, batch["image"], train=False)
    expected, parents_own, childs_through_parent_head, gate = _head_numpy(
        variables, parent_variables, batch["image"], anchor
    )
    assert gate.mean() > 0.9 and float(metrics["gate/to_parent_0"]) == pytest.approx(gate.mean(), rel=1e-5)
    np.testing.assert_allclose(outputs["head"], expected, rtol=1e-4, atol=1e-4)
    near, far = (
        (parents_own, childs_through_parent_head) if anchor == "parent" else (childs_through_parent_head, parents_own)
    )
    # phi lies within lam (1 - a) of its anchor: the head's logits are those of the anchor's features.
    assert np.abs(outputs["head"] - near).max() < 0.05 * np.abs(outputs["head"] - far).max()
    if anchor == "child":  # same widths, gate form: the released code feeds both heads the same mixed vector
        child_vars = {"params": variables["params"]["child"], "batch_stats": variables["batch_stats"]["child"]}
        c = apply_stage(CHILD, child_vars, 0, batch["image"], train=False)[0]
        p = apply_stage(PARENT, parent_variables, 0, batch["image"], train=False)[0]
        phi_child = c + LAM * (1 - jnp.asarray(gate, jnp.float32)) * (p - c)
        np.testing.assert_allclose(
            outputs["backbone"], apply_stage(CHILD, child_vars, 1, phi_child, train=False)[0], rtol=1e-4, atol=1e-4
        )


def test_l3_gradient_to_the_child_depends_on_the_anchor(setup):
    batch, parent_variables = setup
    norms = {}
    for anchor in ("parent", "child"):
        engine = _engine(anchor)
        variables = jax.jit(engine.init)(jax.random.key(0), batch["image"], parent_variables)

        def l3(params):
            return engine.loss(params, variables["batch_stats"], parent_variables, batch)[1]["metrics"]["l3"]

        norms[anchor] = float(optax.tree.norm(jax.jit(jax.grad(l3))(variables["params"])["child"]))
    assert norms["parent"] > 0.0  # not cut off: only damped by lam (1 - a)
    assert norms["child"] > 50 * norms["parent"], norms


def test_head_anchor_is_validated():
    with pytest.raises(ValueError, match="hkt.head_anchor='teacher'"):
        HKTConfig(head_anchor="teacher")
    assert HKTConfig().head_anchor == "parent"


def test_reference_config_is_the_released_code_and_has_one_definition():
    from experiments.configs import default, reference
    from hkt_jax.training.config import apply_overrides, load_config

    config = load_config("reference")
    assert config.hkt.head_anchor == "child" and config.hkt.mode == "gate" and config.hkt.inherit_loss == "ce"
    assert config.hkt.alphas == pytest.approx((1 / 3,) * 3)
    # (L1 + L2 + L3) / 3 at 3x the rate and a third of the decay = the released L1 + L2 + L3 at 0.01, 1e-4
    assert config.optim.learning_rate * config.hkt.alphas[1] == pytest.approx(0.01)
    assert config.optim.weight_decay * config.optim.learning_rate == pytest.approx(1e-4 * 0.01)
    lines = reference.overrides()
    assert "hkt.head_anchor=child" in lines and not any(line.startswith("method=") for line in lines)
    assert apply_overrides(default.get_config(), lines) == config
