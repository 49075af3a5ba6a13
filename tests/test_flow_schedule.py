"""The flow configs follow RAFT's ``train_standard.sh`` where they say so: chairs -> things -> sintel ->
kitti, each stage starting from the previous one's export, chairs at batch 12, gamma 0.85 in the
fine-tuning stages (reaching the task's sequence loss), and the paper's MAE option for L1/L3 trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax import factories
from hkt_jax.config import HKTSettings, apply_overrides, load_config
from hkt_jax.flow_metrics import sequence_loss
from hkt_jax.models import RAFT
from hkt_jax.tasks import Flow, make_task

# RAFT train_standard.sh: (batch, lr, weight decay, steps, crop, gamma, restored from)
RAFT_STANDARD = {
    "flow_chairs": (12, 4e-4, 1e-4, 100_000, (368, 496), 0.8, None),
    "flow_things": (6, 1.25e-4, 1e-4, 100_000, (400, 720), 0.8, "flow_chairs"),
    "flow_sintel": (6, 1.25e-4, 1e-5, 100_000, (368, 768), 0.85, "flow_things"),
    "flow_kitti": (6, 1e-4, 1e-5, 50_000, (288, 960), 0.85, "flow_sintel"),
}


@pytest.mark.parametrize("name", sorted(RAFT_STANDARD))
def test_each_stage_copies_raft_and_starts_from_the_previous_one(name):
    batch, lr, decay, steps, crop, gamma, previous = RAFT_STANDARD[name]
    config = load_config(name)
    assert (config.train.batch_size, config.optim.learning_rate, config.optim.weight_decay, config.train.steps,
            tuple(config.data.crop_size)) == (batch, lr, decay, steps, crop)
    assert (config.optim.optimizer, config.optim.schedule, config.optim.clip_norm) == ("adamw", "one_cycle", 1.0)
    task = make_task(config.task, config)
    assert task.gamma == gamma
    if previous is None:
        assert config.init_ckpt is None
    else:
        assert config.init_ckpt == f"workdirs/{previous}/export/child"
        assert config.train.freeze_batch_norm


def test_gamma_reaches_the_sequence_loss_and_is_validated():
    config = apply_overrides(load_config("flow_smoke"), ["data.loss_gamma=0.5"])
    task = make_task("flow", config)
    rng = np.random.default_rng(0)
    outputs = jnp.asarray(rng.normal(size=(3, 1, 8, 8, 2)), jnp.float32)
    batch = {"flow": jnp.zeros((1, 8, 8, 2)), "valid": jnp.ones((1, 8, 8))}
    errors = np.abs(np.asarray(outputs)).mean(axis=(1, 2, 3, 4))
    assert float(task.task_loss(outputs, batch)) == pytest.approx(0.25 * errors[0] + 0.5 * errors[1] + errors[2],
                                                                  rel=1e-5)
    assert float(task.task_loss(outputs, batch)) == pytest.approx(
        float(sequence_loss(outputs, batch["flow"], batch["valid"], gamma=0.5)), rel=1e-6)
    with pytest.raises(ValueError, match="data.loss_gamma"):
        apply_overrides(load_config("flow_smoke"), ["data.loss_gamma=1.5"])


def test_hkt_with_the_papers_mae_for_l1_l3_trains():
    """hkt.inherit_loss=mae (the paper's Eq. 5/8 on the final flow): a few Adam steps on one batch lower the
    objective and every term stays finite."""
    task = Flow(max_flow=400.0)
    rng = np.random.default_rng(0)
    batch = {"image1": jnp.asarray(rng.uniform(0, 255, (2, 64, 64, 3)), jnp.float32),
             "image2": jnp.asarray(rng.uniform(0, 255, (2, 64, 64, 3)), jnp.float32),
             "flow": jnp.broadcast_to(jnp.asarray([2.0, -1.0]), (2, 64, 64, 2)),  # learnable in a few steps
             "valid": jnp.ones((2, 64, 64), jnp.float32)}
    child, parent = RAFT(small=True, iters=1), RAFT(small=True, iters=1)
    example = task.model_input(batch)
    parent_vars = parent.init(jax.random.key(1), example, train=False)
    loss_fn, variables = factories.make_method(
        "hkt", child, task, example, jax.random.key(0), parent=parent, parent_variables=parent_vars,
        hkt=HKTSettings(inherit_loss="mae", stages=3))
    tx = optax.adam(1e-3)
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, parent_vars, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux["metrics"]

    losses = []
    for _ in range(8):
        params, opt_state, loss, metrics = step(params, opt_state)
        losses.append(float(loss))
        assert all(np.isfinite(float(metrics[k])) for k in ("l1", "l2", "l3"))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
