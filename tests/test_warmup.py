"""The low-rate warm-up of deep CIFAR ResNets (He et al. 2016, Sec. 4.2): values, who gets it, resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hkt_jax.training import factories
from hkt_jax.training.config import OptimConfig, apply_overrides, load_config
from hkt_jax.models import model_spec
from hkt_jax.training.optim import describe_schedule, low_lr_warmup_steps, make_schedule

RESNET110 = model_spec("cifar_resnet", depth=110, num_classes=10)
RESNET20 = model_spec("cifar_resnet", depth=20, num_classes=10)


def test_first_steps_run_at_a_tenth_then_the_schedule_goes_on():
    optim = OptimConfig(learning_rate=0.1, milestones=(100, 150), low_lr_warmup_steps=400)
    schedule = make_schedule(optim, steps_per_epoch=352, total_steps=70400, trained_spec=RESNET110)
    steps = (0, 1, 399, 400, 401, 35199, 35200, 52800)
    assert [float(schedule(s)) for s in steps] == pytest.approx([0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.01, 0.001])
    # jit-compiled with a traced step (as the train step calls it): the same values
    assert [float(jax.jit(schedule)(jnp.int32(s))) for s in steps] == pytest.approx([float(schedule(s)) for s in steps])


def test_warmup_scales_any_schedule_and_only_its_first_steps():
    optim = OptimConfig(
        learning_rate=0.2, schedule="cosine", warmup_epochs=1, low_lr_warmup_steps=5, low_lr_warmup_factor=0.5
    )
    plain = make_schedule(OptimConfig(learning_rate=0.2, schedule="cosine", warmup_epochs=1), 10, 110)
    warmed = make_schedule(optim, 10, 110, RESNET110)
    for step in range(0, 30):
        assert float(warmed(step)) == pytest.approx(float(plain(step)) * (0.5 if step < 5 else 1.0), abs=1e-9)


def test_only_deep_cifar_resnets_get_it_by_default():
    optim = OptimConfig(low_lr_warmup_steps=400)
    assert low_lr_warmup_steps(optim, RESNET110) == 400
    assert low_lr_warmup_steps(optim, model_spec("cifar_resnet", depth=1202)) == 400
    assert low_lr_warmup_steps(optim, RESNET20) == 0
    assert low_lr_warmup_steps(optim, model_spec("toy", widths=(4, 8))) == 0
    assert low_lr_warmup_steps(optim, None) == 0
    every = OptimConfig(low_lr_warmup_steps=7, low_lr_warmup_min_depth=0)  # 0: every network
    assert low_lr_warmup_steps(every, RESNET20) == low_lr_warmup_steps(every, None) == 7
    child = make_schedule(optim, 352, 1000, RESNET20)
    assert float(child(0)) == pytest.approx(0.1)
    _, schedule = factories.make_optimization(optim, 352, 1000, RESNET110)
    assert float(schedule(0)) == pytest.approx(0.01)
    assert "first 400 steps at lr 0.01" in describe_schedule(optim, RESNET110)
    assert "no low-rate warm-up" in describe_schedule(optim, RESNET20)


def test_default_config_warms_up_its_resnet110_parent_not_its_child():
    config = load_config("default")
    assert config.parent.depth == 110 and config.child.depth == 20
    assert low_lr_warmup_steps(config.optim, model_spec("cifar_resnet", **config.parent.kwargs())) == 400
    assert low_lr_warmup_steps(config.optim, model_spec("cifar_resnet", **config.child.kwargs())) == 0
    assert config.record()["optim"]["low_lr_warmup_steps"] == 400  # what config.json shows
    off = apply_overrides(config, ["optim.low_lr_warmup_steps=0"])
    assert low_lr_warmup_steps(off.optim, model_spec("cifar_resnet", **config.parent.kwargs())) == 0


def test_resume_continues_the_warmup_from_the_step():
    """The schedule is a pure function of the step: an optimizer restarted from step k's state applies the
    same rate as one that ran through (what an orbax resume restores is the step and optax's count)."""
    optim = OptimConfig(learning_rate=0.1, schedule="constant", momentum=0.0, weight_decay=0.0, low_lr_warmup_steps=3)
    tx, _ = factories.make_optimization(optim, 10, 100, RESNET110)
    params = jnp.zeros(())
    state = tx.init(params)
    moves = []
    for _ in range(5):
        updates, state = tx.update(jnp.ones(()), state, params)
        moves.append(float(-updates))
        if len(moves) == 2:  # "resume": a fresh optimizer given the saved state
            tx, _ = factories.make_optimization(optim, 10, 100, RESNET110)
    assert moves == pytest.approx([0.01, 0.01, 0.01, 0.1, 0.1])


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.low_lr_warmup_steps=-1", "optim.low_lr_warmup_steps"),
        ("optim.low_lr_warmup_factor=0", "optim.low_lr_warmup_factor"),
        ("optim.low_lr_warmup_factor=1.5", "optim.low_lr_warmup_factor"),
        ("optim.low_lr_warmup_min_depth=-2", "optim.low_lr_warmup_min_depth"),
    ],
)
def test_bad_warmup_settings_are_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_config("smoke"), [override])
