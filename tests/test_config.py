"""Configs: the shipped ones load and validate; overrides parse by field type and fail clearly."""

from __future__ import annotations

import pytest

from hkt_jax.config import apply_overrides, load_config
from hkt_jax.hkt import validate_alphas


@pytest.mark.parametrize("name", ["default", "reference", "smoke"])
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    validate_alphas(config.hkt.alphas)
    if name == "smoke":  # runs unchanged on 1 or 8 (simulated) devices
        assert config.train.batch_size % 8 == 0


def test_reference_config_is_the_released_code():
    config = load_config("reference")
    assert (config.hkt.inherit_loss, config.hkt.mode, config.hkt.lam) == ("ce", "gate", 0.6)
    assert config.optim.learning_rate == 0.01 and config.optim.milestones == (100.0, 150.0)
    assert load_config("default").hkt.inherit_loss == "mae"


def test_overrides_parse_by_type():
    config = apply_overrides(load_config("smoke"), [
        "train.steps=7", "hkt.alphas=0.2,0.6,0.2", "hkt.chunk_size=128", "hkt.head=true,false",
        "train.eval_every_steps=none", "data.source=image_folder", "data.path=/x.tar.gz", "--optim.nesterov=yes",
    ])
    assert config.train.steps == 7
    assert config.hkt.alphas == (0.2, 0.6, 0.2)
    assert config.hkt.chunk_size == 128 and config.hkt.head == (True, False)
    assert config.train.eval_every_steps is None
    assert (config.data.source, config.data.path) == ("image_folder", "/x.tar.gz")
    assert config.optim.nesterov is True


@pytest.mark.parametrize("override, match", [
    ("train.stepz=1", "unknown key 'train.stepz'"),
    ("train.steps=many", "expected int"),
    ("hkt.mode=fast", "expected one of"),
    ("method=distill", "expected one of"),
    ("train.steps", "key=value"),
    ("optim.nesterov=maybe", "true/false"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_config("smoke"), [override])


def test_unknown_config_name():
    with pytest.raises(ValueError, match="no experiments/configs/nope.py"):
        load_config("nope")
