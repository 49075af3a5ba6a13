"""Configs: the shipped ones load and validate; overrides parse by field type and fail clearly."""

from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

from hkt_jax.training import factories
from hkt_jax.grids.comparison import load_grid
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.tasks import Classification
from hkt_jax.engine.hkt import HKT


@pytest.mark.parametrize("name", ["default", "reference", "smoke", "cifar_cpu"])
def test_shipped_configs_build_their_models_and_engine(name):
    """Each shipped config builds its child, its parent and the HKT engine on them (not just parses)."""
    config = load_config(name)
    models = [
        factories.make_model(c, {"num_classes": 10}, stage_split=config.hkt.stage_split, conv_impl="xla")[0]
        for c in (config.child, config.parent)
    ]
    engine = HKT(*models, config.hkt, task=Classification())
    assert len(engine.boundaries) == len(models[0].stage_names) - 1
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: engine.init(jax.random.key(0), x, models[1].init(jax.random.key(1), x)))
    assert "child" in shapes["params"]
    if name == "smoke":  # runs unchanged on 1 or 8 (simulated) devices
        assert config.train.batch_size % 8 == 0


@pytest.mark.parametrize("grid_name", ["cifar_cpu", "cifar_paper"])
def test_every_grid_variant_is_a_valid_config(grid_name):
    grid = load_grid(grid_name)
    for variant, overrides in grid.variants.items():
        config = apply_overrides(load_config(grid.config), [*grid.common, *overrides, f"{grid.seed_key}=3"])
        assert config.train.seed == 3, variant


def test_bad_hkt_settings_fail_when_the_config_is_made():
    for bad, key in (
        ("hkt.lam=2", "lam"),
        ("hkt.alphas=0.5,0.25,0.25", "alphas"),
        ("hkt.mode=sum", "hkt.mode"),
        ("task=detection", "task"),
        ("child.arch=vgg", "vgg"),
    ):
        with pytest.raises(ValueError, match=key):
            apply_overrides(load_config("smoke"), [bad])


def test_reference_config_is_the_released_code():
    config = load_config("reference")
    assert (config.hkt.inherit_loss, config.hkt.mode, config.hkt.lam) == ("ce", "gate", 0.6)
    # the released L1 + L2 + L3 at lr 0.01 = our (L1 + L2 + L3) / 3 at lr 0.03 (tests/test_head_anchor.py)
    assert config.optim.learning_rate == pytest.approx(0.03) and config.optim.milestones == (100.0, 150.0)
    assert config.hkt.head_anchor == "child"
    assert load_config("default").hkt.inherit_loss == "mae"


def test_overrides_parse_by_type():
    config = apply_overrides(
        load_config("smoke"),
        [
            "train.steps=7",
            "hkt.alphas=0.2,0.6,0.2",
            "hkt.chunk_size=128",
            "hkt.head=true,false",
            "train.eval_every_steps=none",
            "data.source=image_folder",
            "data.path=/x.tar.gz",
            "--optim.nesterov=yes",
        ],
    )
    assert config.train.steps == 7
    assert config.hkt.alphas == (0.2, 0.6, 0.2)
    assert config.hkt.chunk_size == 128 and config.hkt.head == (True, False)
    assert config.train.eval_every_steps is None
    assert (config.data.source, config.data.path) == ("image_folder", "/x.tar.gz")
    assert config.optim.nesterov is True


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.stepz=1", "unknown key 'train.stepz'"),
        ("train.steps=many", "expected int"),
        ("hkt.mode=fast", "expected one of"),
        ("method=distill", "expected one of"),
        ("train.steps", "key=value"),
        ("optim.nesterov=maybe", "true/false"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_config("smoke"), [override])


def test_unknown_config_name():
    with pytest.raises(ValueError, match="no experiments/configs/nope.py"):
        load_config("nope")
