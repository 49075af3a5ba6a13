"""BatchNorm folding of the frozen parent: the folded network is the same function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.models import fold
from hkt_jax.engine.hkt import HKT, HKTConfig
from hkt_jax.models import CifarResNet, ToyStagedNet, run_all_stages
from hkt_jax.tasks import Classification


def _trained_like(model, seed=0):
    """Variables with non-trivial BatchNorm statistics and affine parameters (as after training)."""
    variables = model.init(jax.random.key(seed), jnp.zeros((2, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']"):
            return jnp.asarray(rng.uniform(0.3, 2.0, x.shape), x.dtype)
        if "bn" in key:  # mean, scale, bias
            return x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(perturb, dict(variables))


@pytest.mark.parametrize("shortcut,split", [("A", "paper"), ("B", "groups")])
def test_folded_parent_matches_every_stage_output(shortcut, split):
    parent = CifarResNet(depth=8, shortcut=shortcut, stage_split=split)
    variables = _trained_like(parent)
    folded, folded_vars = fold.fold_parent(parent, variables)
    assert isinstance(folded, CifarResNet) and folded.bn_folded and set(folded_vars) == {"params"}
    assert folded.stage_names == parent.stage_names
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 32, 3)), jnp.float32)
    expected = run_all_stages(parent, variables, x, train=False)
    got = run_all_stages(folded, folded_vars, x, train=False)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))


def test_hkt_loss_and_gradients_with_a_folded_parent():
    child = CifarResNet(depth=8)
    parent = CifarResNet(depth=14)
    parent_vars = _trained_like(parent, seed=3)
    folded, folded_vars = fold.fold_parent(parent, parent_vars)
    batch = {
        "image": jnp.asarray(np.random.default_rng(2).normal(size=(8, 32, 32, 3)), jnp.float32),
        "label": jnp.arange(8) % 10,
    }
    losses, grads = [], []
    for p, pv in ((parent, parent_vars), (folded, folded_vars)):
        engine = HKT(child, p, HKTConfig(mode="gate", inherit_loss="ce"), task=Classification())
        v = engine.init(jax.random.key(4), batch["image"][:2], pv)
        (loss, _), g = jax.value_and_grad(engine.loss, has_aux=True)(v["params"], v["batch_stats"], pv, batch)
        losses.append(loss)
        grads.append(g)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()) + 1e-8)


def test_fold_conv_bn_is_the_affine_identity():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    bn = {"scale": rng.normal(size=5), "bias": rng.normal(size=5)}
    stats = {"mean": rng.normal(size=5), "var": rng.uniform(0.5, 2, 5)}
    out = fold.fold_conv_bn(kernel, bn, stats, epsilon=1e-5)
    s = bn["scale"] / np.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(out["kernel"], kernel * s, rtol=1e-6)
    np.testing.assert_allclose(out["bias"], bn["bias"] - stats["mean"] * s, rtol=1e-6)
    assert out["kernel"].dtype == np.float32


def test_folded_network_refuses_train_mode_and_unknown_models_pass_through():
    parent = CifarResNet(depth=8)
    folded, folded_vars = fold.fold_parent(parent, _trained_like(parent))
    with pytest.raises(ValueError, match="inference-only"):
        folded.apply(folded_vars, jnp.zeros((1, 32, 32, 3)), train=True)
    toy = ToyStagedNet()
    toy_vars = toy.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert fold.fold_parent(toy, toy_vars) == (toy, toy_vars)
