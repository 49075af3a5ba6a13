"""Optical-flow loss and metrics (jnp, jit-able), as in princeton-vl/RAFT.

Flows are channels-last ``(..., H, W, 2)`` in pixels (x, y). Metrics come as
per-example *sums* over pixels plus a pixel count, so an evaluation loop can
add them over batches (and hosts) before dividing: ``finalize_flow_metrics``
does the division, either over all pixels (Chairs / Sintel protocol) or as a
mean of per-image means (RAFT's KITTI EPE).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

# RAFT's defaults (train.py): later iterations weigh more, huge flows are ignored.
SEQUENCE_GAMMA = 0.8
MAX_FLOW = 400.0
ACCURACY_THRESHOLDS = (1, 3, 5)
# KITTI outlier: end-point error over 3 px *and* over 5 % of the true flow's length.
F1_ABSOLUTE_PX = 3.0
F1_RELATIVE = 0.05


def _valid_mask(flow_gt: jnp.ndarray, valid: jnp.ndarray, max_flow: float | None) -> jnp.ndarray:
    mask = valid >= 0.5
    if max_flow is not None:
        mask &= jnp.sqrt(jnp.sum(jnp.square(flow_gt), axis=-1)) < max_flow
    return mask


def sequence_loss(
    flow_predictions: jnp.ndarray,
    flow_gt: jnp.ndarray,
    valid: jnp.ndarray,
    *,
    gamma: float = SEQUENCE_GAMMA,
    max_flow: float | None = MAX_FLOW,
) -> jnp.ndarray:
    """RAFT's loss: ``sum_i gamma^(n-1-i) * mean(valid * |pred_i - gt|)``.

    ``flow_predictions`` is ``(iters, B, H, W, 2)``, ``flow_gt`` ``(B, H, W, 2)``,
    ``valid`` ``(B, H, W)``. As in RAFT the mean runs over *all* pixels and both
    channels (invalid ones count as zeros), not over the valid ones only.
    """
    if flow_predictions.ndim != 5 or flow_predictions.shape[1:] != flow_gt.shape:
        raise ValueError(f"sequence_loss expects predictions (iters, *{flow_gt.shape}), got {flow_predictions.shape}")
    mask = _valid_mask(flow_gt, valid, max_flow).astype(flow_predictions.dtype)[..., None]
    num_iters = flow_predictions.shape[0]
    weights = gamma ** jnp.arange(num_iters - 1, -1, -1, dtype=jnp.float32)
    per_iteration = jnp.mean(mask * jnp.abs(flow_predictions - flow_gt), axis=(1, 2, 3, 4))
    return jnp.sum(weights * per_iteration.astype(jnp.float32))


def end_point_error(flow: jnp.ndarray, flow_gt: jnp.ndarray) -> jnp.ndarray:
    """Per-pixel Euclidean distance between two ``(..., 2)`` flows."""
    return jnp.sqrt(jnp.sum(jnp.square(flow.astype(jnp.float32) - flow_gt.astype(jnp.float32)), axis=-1))


def flow_metric_sums(
    flow: jnp.ndarray,
    flow_gt: jnp.ndarray,
    valid: jnp.ndarray,
    *,
    max_flow: float | None = None,
) -> dict[str, jnp.ndarray]:
    """Per-example sums over valid pixels of a ``(B, H, W, 2)`` prediction.

    Keys: ``epe`` (sum of end-point errors), ``1px``/``3px``/``5px`` (pixels with
    EPE below the threshold), ``f1`` (KITTI outliers), ``count`` (valid pixels);
    each of shape ``(B,)``. Padding pixels and padded examples get ``valid = 0``.
    """
    mask = _valid_mask(flow_gt, valid, max_flow).astype(jnp.float32)
    epe = end_point_error(flow, flow_gt)
    magnitude = jnp.sqrt(jnp.sum(jnp.square(flow_gt.astype(jnp.float32)), axis=-1))
    outlier = (epe > F1_ABSOLUTE_PX) & (epe > F1_RELATIVE * magnitude)
    spatial = tuple(range(1, mask.ndim))
    sums = {"epe": jnp.sum(mask * epe, axis=spatial)}
    for threshold in ACCURACY_THRESHOLDS:
        sums[f"{threshold}px"] = jnp.sum(mask * (epe < threshold), axis=spatial)
    sums["f1"] = jnp.sum(mask * outlier, axis=spatial)
    sums["count"] = jnp.sum(mask, axis=spatial)
    return sums


def finalize_flow_metrics(sums: Mapping[str, np.ndarray], *, per_image_epe: bool = False) -> dict[str, float]:
    """Turns accumulated per-example sums (concatenated over batches) into metrics.

    ``epe`` is pixels' mean EPE, or with ``per_image_epe`` the mean over images of
    each image's mean EPE (RAFT's KITTI protocol; images without valid pixels are
    skipped). Accuracies are fractions in [0, 1]; ``f1`` is a percentage, as
    KITTI reports it.
    """
    count = np.asarray(sums["count"], np.float64).reshape(-1)
    total = count.sum()
    if total == 0:
        raise ValueError("finalize_flow_metrics: no valid pixels were accumulated")
    epe_sum = np.asarray(sums["epe"], np.float64).reshape(-1)
    if per_image_epe:
        has_pixels = count > 0
        epe = float(np.mean(epe_sum[has_pixels] / count[has_pixels]))
    else:
        epe = float(epe_sum.sum() / total)
    metrics = {"epe": epe}
    for threshold in ACCURACY_THRESHOLDS:
        metrics[f"{threshold}px"] = float(np.asarray(sums[f"{threshold}px"], np.float64).sum() / total)
    metrics["f1"] = float(100.0 * np.asarray(sums["f1"], np.float64).sum() / total)
    return metrics
