"""Automatic stage alignment: linear CKA against the HSIC formula, the monotone dynamic programme
on planted matrices, K by the largest gap, and the command on tiny models (and, when the shared
data is there, on the converted ResNet-56 -> ResNet-20 with 64 images)."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest
from PIL import Image
from scipy.stats import ortho_group

from experiments import align as align_cli
from hkt_jax.models import align
from hkt_jax.training.checkpoint import load_model, save_model
from hkt_jax.models.tapped import Tapped
from hkt_jax.models.registry import model_spec
from hkt_jax.models.toy import ToyStagedNet
from tests.conftest import require_shared


def hsic_cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019, Eq. 3-4: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),
    HSIC(K, L) = tr(K H L H) / (n - 1)^2, K = X X^T, L = Y Y^T, float64."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n

    def hsic(k_x, k_y):
        return np.trace(k_x @ h @ k_y @ h) / (n - 1) ** 2

    k_x, k_y = x @ x.T, y @ y.T
    return hsic(k_x, k_y) / np.sqrt(hsic(k_x, k_x) * hsic(k_y, k_y))


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))  # related, not identical
    return x, y


def test_linear_cka_matches_hsic_formula_both_forms(features):
    x, y = features
    expected = hsic_cka_reference(x, y)
    assert 0.05 < expected < 0.99  # a value that says something
    assert align.linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    gram_form = align.cka_matrix([align.centred_gram(x)], [align.centred_gram(y)])
    assert gram_form.shape == (1, 1) and gram_form[0, 0] == pytest.approx(expected, rel=1e-10)


def test_linear_cka_invariances(features):
    x, y = features
    base = align.linear_cka(x, y)
    rotation = ortho_group.rvs(x.shape[1], random_state=1)
    assert align.linear_cka(x @ rotation, y) == pytest.approx(base, rel=1e-10)
    assert align.linear_cka(7.5 * x, y) == pytest.approx(base, rel=1e-10)
    assert align.linear_cka(x + 3.0, y) == pytest.approx(base, rel=1e-10)  # centring
    assert align.linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    # Not invariant to an anisotropic scaling (so the checks above can fail).
    assert abs(align.linear_cka(x * np.linspace(0.1, 10, x.shape[1]), y) - base) > 1e-3


def test_linear_cka_rejects_bad_input():
    with pytest.raises(ValueError, match="same examples"):
        align.linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ValueError, match="constant"):
        align.linear_cka(np.ones((5, 2)), np.arange(10.0).reshape(5, 2))
    with pytest.raises(ValueError, match="shape"):
        align.linear_cka(np.ones(5), np.ones(5))


def test_flatten_features_pools_large_maps():
    maps = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    assert np.array_equal(align.flatten_features(maps, 48), maps.reshape(2, 48))  # fits: the whole map
    pooled = np.asarray(align.flatten_features(maps, 12))  # 2x2 windows -> 2 * 2 * 3 features
    expected = maps.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 12)
    assert np.allclose(pooled, expected)
    assert np.allclose(align.flatten_features(maps, 5), maps.mean(axis=(1, 2)))  # nothing fits: global average
    assert align.flatten_features(maps[:, 0, 0], 1).shape == (2, 3)  # vectors pass through


def brute_force(scores: np.ndarray, k: int) -> float:
    rows, cols = scores.shape
    return max(
        sum(scores[i, j] for i, j in zip(ri, ci))
        for ri in itertools.combinations(range(rows), k)
        for ci in itertools.combinations(range(cols), k)
    )


def test_monotone_pairs_finds_planted_path_among_noise():
    rng = np.random.default_rng(2)
    scores = rng.uniform(0.0, 0.3, size=(12, 6))
    planted = ((2, 0), (5, 2), (11, 5))
    for p in planted:
        scores[p] = 0.9
    match = align.monotone_pairs(scores, 3)
    assert match.pairs == planted
    assert match.total == pytest.approx(2.7)


def test_monotone_pairs_beats_greedy():
    # Greedy (the largest entry first) takes (0, 1) = 1.0, after which no second pair fits (nothing lies
    # below row 0 and right of column 1); the optimum for two pairs is the diagonal, 0.8 + 0.8.
    scores = np.array([[0.8, 1.0], [0.0, 0.8]])
    match = align.monotone_pairs(scores, 2)
    assert match.pairs == ((0, 0), (1, 1)) and match.total == pytest.approx(1.6)
    assert align.monotone_pairs(scores, 1).pairs == ((0, 1),)


def test_monotone_pairs_equals_brute_force_on_random_matrices():
    rng = np.random.default_rng(3)
    for _ in range(10):
        scores = rng.uniform(size=(rng.integers(2, 7), rng.integers(2, 6)))
        totals = align.best_totals(scores)
        for k in range(1, min(scores.shape) + 1):
            match = align.monotone_pairs(scores, k)
            rows, cols = zip(*match.pairs)
            assert len(match.pairs) == k and list(rows) == sorted(set(rows)) and list(cols) == sorted(set(cols))
            assert match.total == pytest.approx(brute_force(scores, k))
            assert totals[k - 1] == pytest.approx(match.total)


def test_monotone_pairs_rejects_bad_k():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\]"):
        align.monotone_pairs(np.ones((4, 2)), 3)
    with pytest.raises(ValueError, match="non-finite"):
        align.monotone_pairs(np.array([[np.nan, 1.0]]), 1)


def test_k_by_largest_gap():
    # gains 0.9, 0.9, 0.85, 0.1, 0.05: the drop after the third pair is the largest.
    totals = np.cumsum([0.9, 0.9, 0.85, 0.1, 0.05])
    assert align.k_by_largest_gap(totals) == 3
    assert align.k_by_largest_gap(totals, k_max=3) == 2  # drops 0.0, 0.05 within the first three
    assert align.k_by_largest_gap([0.7]) == 1
    # Planted: three high entries on a monotone path among low noise -> K = 3, those pairs.
    rng = np.random.default_rng(4)
    scores = rng.uniform(0.0, 0.2, size=(9, 7))
    for p in ((1, 1), (4, 3), (8, 6)):
        scores[p] = 0.95
    assert align.k_by_largest_gap(align.best_totals(scores)) == 3


# -- the command, on tiny models and (when present) on the shared data ---------------------------


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    """A random-init toy classifier saved as a model checkpoint, and a 16-image test folder."""
    root = tmp_path_factory.mktemp("align")
    model = ToyStagedNet(widths=(4, 8), num_classes=3)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    save_model(root / "toy", variables, model_spec("toy", widths=[4, 8], num_classes=3))
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        folder = root / "images" / "test" / label
        folder.mkdir(parents=True)
        for n in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{n}.png")
    return root


def test_command_on_one_network_twice_matches_each_module_with_itself(toy_setup, capsys):
    root = toy_setup
    common = [
        "--parent_ckpt",
        str(root / "toy"),
        "--child_ckpt",
        str(root / "toy"),
        "--data",
        str(root / "images"),
        "--images",
        "12",
        "--batch_size",
        "5",
    ]  # 5 does not divide 12: a short last batch
    assert align_cli.main([*common, "--k", "3", "--json", str(root / "a.json"), "--png", str(root / "a.png")]) == 0
    out = capsys.readouterr().out
    record = json.loads((root / "a.json").read_text())
    # Candidates in forward (return) order, the network's output (fc) left out.
    assert record["parent"]["paths"] == record["child"]["paths"] == ["stem_conv", "stem_bn", "body_conv"]
    assert [(p["parent"], p["child"]) for p in record["pairs"]] == [(p, p) for p in record["parent"]["paths"]]
    assert all(p["cka"] == pytest.approx(1.0, abs=1e-6) for p in record["pairs"])
    matrix = np.array(record["matrix"])
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1.0, atol=1e-6) and np.all(matrix <= 1 + 1e-9)
    assert "override: hkt.parent_taps=stem_conv,stem_bn,body_conv hkt.child_taps=stem_conv,stem_bn,body_conv" in out
    assert (root / "a.png").stat().st_size > 1000
    # The chosen paths are taps Tapped accepts (its forward checks existence and order) and runs stage by stage.
    tapped = Tapped(ToyStagedNet(widths=(4, 8), num_classes=3), taps=[p["parent"] for p in record["pairs"]])
    variables = load_model(root / "toy")[0]
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    staged = images
    for index in range(len(tapped.stage_names)):
        staged = tapped.apply(variables, index, staged, train=False, method="stage")
    assert np.allclose(staged, tapped.apply(variables, images), atol=1e-5)

    assert align_cli.main([*common, "--child_taps", "body_conv"]) == 0
    assert "hkt.parent_taps=body_conv hkt.child_taps=body_conv" in capsys.readouterr().out
    quick = [*common[:-4], "--images", "4"]
    with pytest.raises(SystemExit, match="only 3 monotone pairs fit"):
        align_cli.main([*quick, "--k", "4"])
    with pytest.raises(SystemExit, match="cannot end a stage"):
        align_cli.main([*quick, "--parent_taps", "fc"])
    with pytest.raises(SystemExit, match="model.json says 'toy'"):
        align_cli.main([*common, "--parent", "cifar_resnet"])


def test_command_on_converted_resnet20_vs_itself(tmp_path):
    archive = require_shared("cifar10-q75", "cifar10-q75-imagefolder.tar.gz")
    checkpoint = require_shared("resnet-cifar10-torch", "resnet20-12fca82f.th")
    pytest.importorskip("torch", reason="converting the shared ResNet-20 needs PyTorch")
    from hkt_jax.convert import resnet_from_torch

    save_model(tmp_path / "r20", resnet_from_torch(checkpoint, 20), model_spec("cifar_resnet", depth=20))
    args = [
        "--parent_ckpt",
        str(tmp_path / "r20"),
        "--child_ckpt",
        str(tmp_path / "r20"),
        "--data",
        str(archive),
        "--images",
        "32",
        "--batch_size",
        "32",
        "--include",
        "^layer3",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert align_cli.main([*args, "--k", "3"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["parent"]["paths"] == ["layer3_0", "layer3_1", "layer3_2"]
    assert all(p["parent"] == p["child"] and p["cka"] == pytest.approx(1.0, abs=1e-5) for p in record["pairs"])
    assert len(record["pairs"]) == 3
