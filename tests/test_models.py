"""Staged CIFAR ResNets: sizes, stage splits, and the staged contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.models import CifarResNet, build_model, model_spec, run_all_stages


@pytest.mark.parametrize("depth, shortcut, expected", [(20, "A", 269_722), (110, "A", 1_727_962), (20, "B", 272_474)])
def test_parameter_counts(depth, shortcut, expected):
    """ResNet-20/110 option A: the counts of the reference PyTorch models (He et al., Table 6: 0.27M / 1.7M)."""
    shapes = jax.eval_shape(
        lambda: CifarResNet(depth=depth, shortcut=shortcut).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    )
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])) == expected


def test_stage_splits_compose_to_the_full_network():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    paper = CifarResNet(depth=8)
    variables = paper.init(jax.random.key(0), x)
    groups = CifarResNet(depth=8, stage_split="groups")
    full = paper.apply(variables, x)
    paper_out = run_all_stages(paper, variables, x)
    group_out = run_all_stages(groups, variables, x)
    assert [o.shape for o in paper_out] == [(2, 64), (2, 10)]
    assert [o.shape for o in group_out] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 10)]
    np.testing.assert_allclose(paper_out[-1], full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(group_out[-1], full, rtol=1e-5, atol=1e-5)


def test_bad_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_registry_round_trip():
    model = build_model(model_spec("cifar_resnet", depth=32, num_classes=100))
    assert (model.depth, model.num_classes) == (32, 100)
    with pytest.raises(ValueError, match="unknown architecture"):
        model_spec("vgg")
