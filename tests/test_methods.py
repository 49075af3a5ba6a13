"""Training-method pieces against independent references: KD formula, PyTorch SGD, LR schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.training.config import OptimConfig
from hkt_jax.training.methods import kd_loss
from hkt_jax.models import ToyStagedNet
from hkt_jax.training.optim import make_optimizer, make_schedule
from hkt_jax.tasks import Classification
from tests import np_reference

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs


def test_kd_loss_matches_numpy_formula():
    student, teacher = ToyStagedNet(widths=(4, 4), num_classes=5), ToyStagedNet(widths=(6, 6), num_classes=5)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 5, size=6), jnp.int32),
    }
    s_vars, t_vars = student.init(jax.random.key(0), batch["image"]), teacher.init(jax.random.key(1), batch["image"])
    params, stats = {"child": s_vars["params"]}, {"child": s_vars["batch_stats"]}
    loss, aux = kd_loss(student, teacher, Classification(), temperature=3.0, weight=0.7)(params, stats, t_vars, batch)

    s = np.asarray(student.apply(s_vars, batch["image"], train=True, mutable=["batch_stats"])[0], np.float64)
    t = np.asarray(teacher.apply(t_vars, batch["image"], train=False), np.float64)

    ce = np_reference.cross_entropy(s, np.asarray(batch["label"]))
    kl = np_reference.hinton_kd(s, t, 3.0)
    np.testing.assert_allclose(float(loss), 0.3 * ce + 0.7 * kl, rtol=1e-5)
    np.testing.assert_allclose(float(aux["metrics"]["l3"]), kl, rtol=1e-5)


def test_optimizer_matches_torch_sgd():
    torch = pytest.importorskip("torch", reason="PyTorch's SGD is the reference")
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(4)]
    optim = OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-2, schedule="constant")
    tx = make_optimizer(optim, make_schedule(optim, 10, 100))
    params, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)

    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-2)
    for g in grads:
        w.grad = torch.from_numpy(g.copy())
        sgd.step()
    np.testing.assert_allclose(np.asarray(params), w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_multistep_and_cosine_schedules():
    multistep = make_schedule(
        OptimConfig(learning_rate=0.1, milestones=(100, 150)), steps_per_epoch=10, total_steps=2000
    )
    assert [float(multistep(s)) for s in (0, 999, 1000, 1499, 1500)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    cosine = make_schedule(OptimConfig(learning_rate=0.2, schedule="cosine", warmup_epochs=1), 10, 110)
    assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(0.2)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(OptimConfig(schedule="step"), 10, 100)
