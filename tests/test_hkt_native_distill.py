"""hkt.native_target=parent (HKT + KD): L2 becomes KD's loss from the frozen parent's own outputs, checked
against the float64 NumPy formula; L1 and L3 stay what they are without it; the parent gets no gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import smoke
from hkt_jax.models import ToyStagedNet
from hkt_jax.tasks import Classification
from hkt_jax.training import factories, hooks
from hkt_jax.training.config import HKTSettings, KDSettings, apply_overrides
from tests import np_reference

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64

CHILD = ToyStagedNet(widths=(4, 6), strides=(2, 1), num_classes=5)
PARENT = ToyStagedNet(widths=(8, 12), strides=(1, 1), num_classes=5)


def test_native_stream_distils_from_the_parents_outputs():
    rng = np.random.default_rng(3)
    batch = {
        "image": jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 5, size=6), jnp.int32),
    }
    parent_vars = PARENT.init(jax.random.key(1), batch["image"])
    kd = KDSettings(temperature=3.0, weight=0.7)

    def method(native_target):
        return factories.make_method(
            "hkt",
            CHILD,
            Classification(),
            batch["image"],
            jax.random.key(0),
            parent=PARENT,
            parent_variables=parent_vars,
            hkt=HKTSettings(mode="gate", native_target=native_target),
            kd=kd,
        )

    distil_fn, init = method("parent")
    labels_fn, labels_init = method("labels")
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(labels_init), strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same variables: only the loss differs
    loss, aux = jax.jit(distil_fn)(init["params"], init["batch_stats"], parent_vars, batch)
    _, labels_aux = jax.jit(labels_fn)(init["params"], init["batch_stats"], parent_vars, batch)

    child_vars = {"params": init["params"]["child"], "batch_stats": init["batch_stats"]["child"]}
    s = np.asarray(CHILD.apply(child_vars, batch["image"], train=True, mutable=["batch_stats"])[0], np.float64)
    t = np.asarray(PARENT.apply(parent_vars, batch["image"], train=False), np.float64)
    ce = np_reference.cross_entropy(s, np.asarray(batch["label"]))
    kl = np_reference.hinton_kd(s, t, 3.0)
    metrics, labels_metrics = aux["metrics"], labels_aux["metrics"]
    np.testing.assert_allclose(float(metrics["l2"]), 0.3 * ce + 0.7 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(labels_metrics["l2"]), ce, rtol=1e-5)
    assert kl > 1e-3  # an untrained child disagrees with the parent: the KD term is not vacuous
    for term in ("l1", "l3"):
        np.testing.assert_allclose(float(metrics[term]), float(labels_metrics[term]), rtol=1e-6)
    a1, a2, a3 = HKTSettings().alphas
    np.testing.assert_allclose(float(loss), a1 * metrics["l1"] + a2 * metrics["l2"] + a3 * metrics["l3"], rtol=1e-6)

    parent_grad = jax.jit(jax.grad(lambda pv: distil_fn(init["params"], init["batch_stats"], pv, batch)[0]))(
        parent_vars
    )
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(parent_grad))


def test_native_target_is_checked():
    config = apply_overrides(smoke.get_config(), ["hkt.native_target=parent"])
    assert config.hkt.native_target == "parent"
    assert "L2 distils from the parent" in hooks.hkt_line(config.hkt)
    assert "distils" not in hooks.hkt_line(smoke.get_config().hkt)
    with pytest.raises(ValueError, match="native_target"):
        apply_overrides(smoke.get_config(), ["hkt.native_target=teacher"])
