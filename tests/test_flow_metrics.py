"""Flow loss and metrics against float64 NumPy formulas, and known flows on the shared samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.data.flow_datasets import flow_folder
from hkt_jax.data.flow_pipeline import flow_eval_batches
from hkt_jax.tasks.flow_metrics import finalize_flow_metrics, flow_metric_sums, sequence_loss
from tests.conftest import require_shared


def numpy_sequence_loss(predictions, gt, valid, gamma=0.8, max_flow=400.0):
    """RAFT train.py's sequence_loss, transcribed to float64 NumPy (NCHW there, NHWC here)."""
    predictions, gt = np.asarray(predictions, np.float64), np.asarray(gt, np.float64)
    magnitude = np.sqrt(np.sum(gt**2, axis=-1))
    mask = (np.asarray(valid) >= 0.5) & (magnitude < max_flow)
    total, count = 0.0, len(predictions)
    for i, prediction in enumerate(predictions):
        total += gamma ** (count - i - 1) * np.mean(mask[..., None] * np.abs(prediction - gt))
    return total


def numpy_metrics(flow, gt, valid):
    """EPE, accuracies and KITTI F1-all over valid pixels, float64."""
    flow, gt = np.asarray(flow, np.float64), np.asarray(gt, np.float64)
    mask = np.asarray(valid) >= 0.5
    epe = np.sqrt(np.sum((flow - gt) ** 2, axis=-1))[mask]
    magnitude = np.sqrt(np.sum(gt**2, axis=-1))[mask]
    return {
        "epe": epe.mean(),
        "1px": np.mean(epe < 1),
        "3px": np.mean(epe < 3),
        "5px": np.mean(epe < 5),
        "f1": 100 * np.mean((epe > 3) & (epe / magnitude > 0.05)),
    }


def random_case(seed, iters=4, shape=(2, 8, 12)):
    rng = np.random.default_rng(seed)
    gt = rng.normal(0, 20, shape + (2,)).astype(np.float32)
    gt[0, 0, :3] = 450.0  # beyond max_flow: ignored by the loss
    predictions = (gt + rng.normal(0, 4, (iters,) + shape + (2,))).astype(np.float32)
    valid = (rng.random(shape) < 0.7).astype(np.float32)
    return predictions, gt, valid


def test_sequence_loss_matches_numpy():
    predictions, gt, valid = random_case(0)
    loss = jax.jit(sequence_loss)(predictions, gt, valid)
    np.testing.assert_allclose(loss, numpy_sequence_loss(predictions, gt, valid), rtol=1e-5)
    np.testing.assert_allclose(
        sequence_loss(predictions, gt, valid, gamma=0.5, max_flow=None),
        numpy_sequence_loss(predictions, gt, valid, gamma=0.5, max_flow=np.inf),
        rtol=1e-5,
    )
    # Only the last prediction matters when gamma -> 0, and a perfect one costs nothing.
    perfect = predictions.copy()
    perfect[-1] = gt
    assert float(sequence_loss(perfect, gt, valid, gamma=0.0)) == 0.0
    with pytest.raises(ValueError, match="iters"):
        sequence_loss(predictions[0], gt, valid)


def test_sequence_loss_gradient_ignores_invalid_and_huge_flows():
    predictions, gt, valid = random_case(1, iters=2)
    gradient = jax.grad(sequence_loss)(jnp.asarray(predictions), gt, valid)
    ignored = (valid < 0.5) | (np.linalg.norm(gt, axis=-1) >= 400)
    assert np.all(np.asarray(gradient)[:, ignored] == 0)
    assert np.all(np.asarray(gradient)[:, ~ignored] != 0)


def test_metric_sums_match_numpy_and_aggregate_over_batches():
    _, gt, valid = random_case(2, shape=(6, 10, 14))
    flow = gt + np.random.default_rng(3).normal(0, 3, gt.shape).astype(np.float32)
    compute = jax.jit(flow_metric_sums)
    parts = [jax.device_get(compute(flow[i : i + 2], gt[i : i + 2], valid[i : i + 2])) for i in (0, 2, 4)]
    sums = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    assert sums["epe"].shape == (6,)
    metrics = finalize_flow_metrics(sums)
    for key, value in numpy_metrics(flow, gt, valid).items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    per_image = np.mean([numpy_metrics(flow[i], gt[i], valid[i])["epe"] for i in range(6)])
    np.testing.assert_allclose(finalize_flow_metrics(sums, per_image_epe=True)["epe"], per_image, rtol=1e-5)


def test_f1_needs_both_three_pixels_and_five_percent():
    gt = np.zeros((1, 1, 4, 2), np.float32)
    gt[0, 0, :, 0] = [100.0, 50.0, 10.0, 0.0]
    error = np.array([4.0, 4.0, 2.9, 3.5], np.float32)  # along y: EPE is exactly this
    flow = gt.copy()
    flow[0, 0, :, 1] = error
    sums = flow_metric_sums(flow, gt, np.ones((1, 1, 4), np.float32))
    # 4 px on 100 px is 4 % (fine); 4 on 50 is 8 % (outlier); 2.9 px is under 3 px; 3.5 px on 0 is an outlier.
    assert float(sums["f1"][0]) == 2.0
    assert float(sums["1px"][0]) == 0.0 and float(sums["3px"][0]) == 1.0 and float(sums["5px"][0]) == 4.0
    with pytest.raises(ValueError, match="no valid pixels"):
        finalize_flow_metrics(flow_metric_sums(flow, gt, np.zeros((1, 1, 4), np.float32)))


def evaluate(dataset, predict) -> dict[str, float]:
    """Masked sums over padded eval batches, as an evaluation loop would run them."""
    compute = jax.jit(flow_metric_sums)
    parts = []
    for batch in flow_eval_batches(dataset, global_batch_size=1):
        parts.append(jax.device_get(compute(predict(batch), batch["flow"], batch["valid"])))
    return finalize_flow_metrics({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})


@pytest.mark.parametrize("relative", ["flyingchairs", "sintel-alley1"])
def test_known_flows_on_shared_samples(relative):
    dataset = flow_folder(require_shared("flow", relative))
    magnitudes = np.concatenate(
        [np.linalg.norm(dataset[i]["flow"].astype(np.float64), axis=-1).ravel() for i in range(len(dataset))]
    )

    zero = evaluate(dataset, lambda batch: np.zeros_like(batch["flow"]))
    np.testing.assert_allclose(zero["epe"], magnitudes.mean(), rtol=1e-5)
    np.testing.assert_allclose(zero["1px"], np.mean(magnitudes < 1), rtol=1e-6)

    exact = evaluate(dataset, lambda batch: batch["flow"])
    assert exact["epe"] == 0.0 and exact["1px"] == 1.0 and exact["f1"] == 0.0

    # Isotropic Gaussian noise: the EPE is Rayleigh distributed, mean sigma * sqrt(pi / 2).
    # Outlier where the error exceeds max(3 px, 5 % of |gt|): P(R > t) = exp(-t^2 / (2 sigma^2)).
    sigma, rng = 1.2, np.random.default_rng(5)
    noisy = evaluate(dataset, lambda batch: batch["flow"] + rng.normal(0, sigma, batch["flow"].shape))
    np.testing.assert_allclose(noisy["epe"], sigma * np.sqrt(np.pi / 2), rtol=0.01)
    np.testing.assert_allclose(noisy["1px"], 1 - np.exp(-1 / (2 * sigma**2)), atol=0.005)
    outlier_threshold = np.maximum(3.0, 0.05 * magnitudes)
    expected_f1 = 100 * np.mean(np.exp(-(outlier_threshold**2) / (2 * sigma**2)))
    np.testing.assert_allclose(noisy["f1"], expected_f1, rtol=0.05)
