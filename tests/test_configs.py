"""Every experiment config and grid loads; the paper-size configs have the sizes their docstrings state."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from hkt_jax.grids import comparison
from hkt_jax.training.config import load_config
from hkt_jax.training.experiment_cli import config_name
from hkt_jax.models import parameter_count
from hkt_jax.models.registry import build_model, model_spec

CONFIGS = sorted(p.stem for p in (Path(__file__).parent.parent / "experiments" / "configs").glob("*.py")
                 if not p.stem.startswith(("_", "grid_")))
GRIDS = sorted(p.stem[len("grid_"):] for p in (Path(__file__).parent.parent / "experiments" / "configs").glob("grid_*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
    config = load_config(name)
    assert config.record()["method"] == config.method


@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_loads_and_its_variant_configs_exist(name):
    grid = comparison.load_grid(name)
    # The flow and segmentation entry points name their configs without the file prefix.
    prefix = {"experiments.flow_hkt": "flow_", "experiments.seg_hkt": "seg_"}.get(grid.experiment, "")
    for variant in grid.variants:
        assert config_name(grid.config_for(variant), prefix) in CONFIGS, (variant, grid.config_for(variant))


def test_segmentation_at_the_papers_sizes():
    """The paper: an 80M-parameter parent and a 0.8M child (within 6 %)."""
    config = load_config("seg_lits_paper")
    counts = {}
    for role in ("parent", "child"):
        model_config = getattr(config, role)
        model = build_model(model_spec(model_config.arch, **model_config.kwargs(), num_classes=3, in_channels=1))
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False))
        counts[role] = parameter_count(variables["params"])
    assert counts == {"parent": 84_233_003, "child": 843_011}
