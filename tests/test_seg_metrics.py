"""Segmentation losses and Dice metrics against float64 NumPy formulas, empty masks included."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.tasks import seg_metrics
from hkt_jax.tasks.seg_metrics import LITS_REGIONS, DiceAccumulator, class_regions, dice_sums


def _batch(seed=0, shape=(3, 6, 5), num_classes=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, num_classes)) * 2
    mask = rng.integers(0, num_classes, size=shape)
    return logits, mask


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_dice(pred, true):
    """2|P & G| / (|P| + |G|), 1 when both are empty."""
    denominator = pred.sum() + true.sum()
    return 1.0 if denominator == 0 else 2.0 * np.logical_and(pred, true).sum() / denominator


def test_cross_entropy_and_soft_dice_match_numpy():
    logits, mask = _batch()
    batch = {"mask": jnp.asarray(mask)}
    probs = _softmax(logits)
    ce = -np.mean(np.log(np.take_along_axis(probs, mask[..., None], -1)))
    onehot = np.eye(3)[mask]
    smooth = 1e-5
    dice = [
        (2 * (probs[..., c] * onehot[..., c]).sum() + smooth) / (probs[..., c].sum() + onehot[..., c].sum() + smooth)
        for c in range(3)
    ]
    np.testing.assert_allclose(
        jax.jit(seg_metrics.cross_entropy)(jnp.asarray(logits, jnp.float32), batch), ce, rtol=1e-5
    )
    np.testing.assert_allclose(
        jax.jit(seg_metrics.soft_dice_loss)(jnp.asarray(logits, jnp.float32), batch), 1 - np.mean(dice[1:]), rtol=1e-5
    )
    np.testing.assert_allclose(
        jax.jit(functools.partial(seg_metrics.soft_dice_loss, include_background=True))(
            jnp.asarray(logits, jnp.float32), batch
        ),
        1 - np.mean(dice),
        rtol=1e-5,
    )
    loss = seg_metrics.make_segmentation_loss(ce_weight=0.3, dice_weight=2.0)
    np.testing.assert_allclose(
        jax.jit(loss)(jnp.asarray(logits, jnp.float32), batch), 0.3 * ce + 2.0 * (1 - np.mean(dice[1:])), rtol=1e-5
    )
    mae = np.mean(np.abs(probs - onehot))
    np.testing.assert_allclose(
        jax.jit(seg_metrics.segmentation_mae)(jnp.asarray(logits, jnp.float32), batch), mae, rtol=1e-5
    )
    with pytest.raises(ValueError, match="weights"):
        seg_metrics.make_segmentation_loss(ce_weight=0.0, dice_weight=0.0)


def test_padded_slices_do_not_count_and_empty_classes_give_finite_gradients():
    logits, mask = _batch(seed=1)
    logits, mask = jnp.asarray(logits, jnp.float32), jnp.asarray(mask)
    loss = jax.jit(seg_metrics.segmentation_loss)
    real = loss(logits[:2], {"mask": mask[:2]})
    padded = loss(logits, {"mask": mask, "valid": jnp.array([1.0, 1.0, 0.0])})
    np.testing.assert_allclose(padded, real, rtol=1e-6)
    empty = {"mask": jnp.zeros_like(mask)}  # no liver, no tumour anywhere
    grads = jax.jit(jax.grad(seg_metrics.segmentation_loss))(logits, empty)
    assert np.all(np.isfinite(grads)) and np.abs(grads).max() > 0


def test_pixel_kd_is_kl_divergence_at_temperature():
    student, _ = _batch(seed=2)
    teacher, _ = _batch(seed=3)
    t = 2.0
    p, q = _softmax(teacher / t), _softmax(student / t)
    expected = t**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    got = seg_metrics.pixel_kd_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), temperature=t)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def _volumes(seed=0):
    """Four cases: ordinary, tumour-free but tumour predicted, everything empty, perfect."""
    rng = np.random.default_rng(seed)
    cases = {}
    true = rng.integers(0, 3, size=(4, 8, 8))
    cases["a"] = (np.where(rng.random(true.shape) < 0.3, rng.integers(0, 3, true.shape), true), true)
    true = np.where(rng.random((3, 8, 8)) < 0.5, 1, 0)
    pred = true.copy()
    pred[0, :2, :2] = 2
    cases["b"] = (pred, true)
    cases["c"] = (np.zeros((2, 8, 8), int), np.zeros((2, 8, 8), int))
    true = rng.integers(0, 3, size=(5, 8, 8))
    cases["d"] = (true.copy(), true)
    return cases


def _numpy_lits(cases, regions):
    per_case, pooled = {}, {}
    for name, labels in regions:
        scores = []
        for pred, true in cases.values():
            scores.append(_numpy_dice(np.isin(pred, labels), np.isin(true, labels)))
        per_case[name] = np.mean(scores)
        all_pred = np.concatenate([np.isin(p, labels).ravel() for p, _ in cases.values()])
        all_true = np.concatenate([np.isin(t, labels).ravel() for _, t in cases.values()])
        pooled[name] = _numpy_dice(all_pred, all_true)
    return per_case, pooled


def test_lits_dice_per_case_and_global_match_numpy_with_empty_conventions():
    cases = _volumes()
    expected_case, expected_global = _numpy_lits(cases, LITS_REGIONS)
    # Whole volumes at once ...
    whole = DiceAccumulator(LITS_REGIONS)
    for case_id, (pred, true) in cases.items():
        whole.add_volume(pred, true, case_id)
    # ... and the same slices in shuffled batches of 3 that mix cases.
    batched = DiceAccumulator(LITS_REGIONS)
    slices = [(case_id, p, t) for case_id, (pv, tv) in cases.items() for p, t in zip(pv, tv)]
    order = np.random.default_rng(0).permutation(len(slices))
    for start in range(0, len(order), 3):
        chosen = [slices[i] for i in order[start : start + 3]]
        sums = jax.device_get(
            jax.jit(dice_sums, static_argnums=2)(
                jnp.stack([c[1] for c in chosen]), jnp.stack([c[2] for c in chosen]), LITS_REGIONS
            )
        )
        batched.add(sums, [c[0] for c in chosen])
    for accumulator in (whole, batched):
        result = accumulator.result()
        assert accumulator.num_cases == 4
        for name, _ in LITS_REGIONS:
            np.testing.assert_allclose(result[f"dice_per_case/{name}"], expected_case[name], rtol=1e-12)
            np.testing.assert_allclose(result[f"dice_global/{name}"], expected_global[name], rtol=1e-12)
        per_case = accumulator.per_case()
        assert per_case["c"].tolist() == [1.0, 1.0]  # both empty -> 1
        assert per_case["b"][1] == 0.0  # no tumour, tumour predicted -> 0
        assert per_case["d"].tolist() == [1.0, 1.0]


def test_class_regions_and_padding_in_dice_sums():
    pred = np.array([[[0, 1], [2, 2]], [[1, 1], [1, 1]]])
    true = np.array([[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
    for sums in (
        dice_sums(pred, true, class_regions(3), valid=np.array([1, 0])),  # NumPy path
        dice_sums(jnp.asarray(pred), jnp.asarray(true), class_regions(3), valid=jnp.array([1, 0])),
    ):
        assert np.asarray(sums["intersection"]).tolist() == [[1, 1, 1], [0, 0, 0]]
        assert np.asarray(sums["predicted"]).tolist() == [[1, 1, 2], [0, 0, 0]]
        assert np.asarray(sums["target"]).tolist() == [[1, 2, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="regions"):
        DiceAccumulator(LITS_REGIONS).add(jax.device_get(sums), [0, 1])
