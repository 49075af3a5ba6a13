"""ETM modules: Extractor joins leaves, Transfer aligns shapes (checked against PyTorch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.engine.etm import Extractor, Transfer, get_leaf, set_leaf

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_extractor_single_concat_sum():
    tree = {"a": _normal((2, 4, 4, 3), 0), "b": _normal((2, 4, 4, 3), 1), "nested": [_normal((2, 5), 2)]}
    np.testing.assert_array_equal(Extractor(("a",)).apply({}, tree), tree["a"])
    np.testing.assert_array_equal(Extractor(("nested/0",)).apply({}, tree), tree["nested"][0])
    cat = Extractor(("a", "b"), "concat").apply({}, tree)
    np.testing.assert_array_equal(cat, np.concatenate([tree["a"], tree["b"]], -1))
    np.testing.assert_allclose(Extractor(("a", "b"), "sum").apply({}, tree), tree["a"] + tree["b"])
    with pytest.raises(ValueError, match="no leaf 'c'"):
        Extractor(("c",)).apply({}, tree)
    with pytest.raises(ValueError, match="sum needs equal shapes"):
        Extractor(("a", "nested/0"), "sum").apply({}, tree)


def test_set_leaf_replaces_only_that_leaf():
    tree = {"h": jnp.zeros(2), "pair": (jnp.ones(1), jnp.ones(2))}
    out = set_leaf(tree, "pair/1", jnp.full(2, 7.0))
    np.testing.assert_array_equal(get_leaf(out, "pair/1"), [7.0, 7.0])
    np.testing.assert_array_equal(out["h"], tree["h"])
    assert set_leaf(tree, "", 3) == 3


def test_transfer_has_no_parameters_when_shapes_match():
    z = _normal((2, 4, 4, 8), 3)
    variables = Transfer().init(jax.random.key(0), z, z)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(Transfer().apply(variables, z, z), z)


def test_transfer_projects_channels_with_a_1x1_conv():
    z, like = _normal((2, 4, 4, 8), 4), jnp.zeros((2, 4, 4, 5))
    variables = Transfer().init(jax.random.key(1), z, like)
    kernel, bias = variables["params"]["proj"]["kernel"], variables["params"]["proj"]["bias"]
    assert kernel.shape == (8, 5)
    expected = np.einsum("bhwc,cd->bhwd", np.asarray(z, np.float64), np.asarray(kernel, np.float64)) + np.asarray(bias)
    np.testing.assert_allclose(Transfer().apply(variables, z, like), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src, dst", [((6, 10), (3, 5)), ((3, 5), (8, 11)), ((8, 8), (4, 4))])
def test_transfer_resize_matches_torch_bilinear(src, dst):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for bilinear resizing")
    z = _normal((2, *src, 3), 5)
    like = jnp.zeros((2, *dst, 3))
    out = Transfer().apply({}, z, like)
    reference = (
        torch.nn.functional.interpolate(
            torch.from_numpy(np.array(z)).permute(0, 3, 1, 2).double(), size=dst, mode="bilinear", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_transfer_resize_and_project_commute_so_order_is_free():
    z, like = _normal((1, 8, 8, 6), 6), jnp.zeros((1, 4, 4, 3))
    variables = Transfer().init(jax.random.key(2), z, like)
    p = variables["params"]["proj"]
    up_first = jax.image.resize(z @ p["kernel"] + p["bias"], (1, 4, 4, 3), "linear", antialias=False)
    np.testing.assert_allclose(Transfer().apply(variables, z, like), up_first, rtol=1e-5, atol=1e-5)


def test_transfer_rejects_rank_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 8\).*\(2, 8\)"):
        Transfer().init(jax.random.key(0), jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 8)))
