"""Optical flow: two frames in, RAFT's per-iteration flows ``(iters, B, H, W, 2)`` out (paper Table 1).

Batches are ``{"image1", "image2"}`` (B, H, W, 3) in [0, 255], ``flow`` (B, H, W, 2)
and ``valid`` (B, H, W); eval batches add ``mask`` (real examples) and
``region``. The loss is RAFT's sequence loss (gamma 0.8, valid pixels only,
ground truth over 400 px ignored); L1 / L3 of HKT are the same sequence loss
on the backbone and head streams ("seq"), or the paper's MAE on their final
flow ("mae"). Evaluation sums end-point errors over valid pixels (the Chairs /
Sintel protocol), 1/3/5-px accuracy, KITTI's F1-all and a per-image EPE (the
KITTI protocol). The best model has the lowest validation EPE.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.data.flow_io import flow_to_color
from hkt_jax.tasks.flow_metrics import MAX_FLOW, SEQUENCE_GAMMA, end_point_error, flow_metric_sums, sequence_loss
from hkt_jax.tasks.base import Batch, LossFn, Task
from hkt_jax.tasks.registry import register_task
from hkt_jax.tasks.flow_data import FlowDataConfig, FlowDatasets

#: the inference timing in the run summary needs no more frames than this per call.
TIMING_BATCH = 8


def final_flow_mae(outputs: jax.Array, batch: Batch, max_flow: float = MAX_FLOW) -> jax.Array:
    """The paper's MAE (Eq. 5, 8) for flow: mean |final flow - gt| over valid pixels (< max_flow px) and (x, y)."""
    final = outputs[-1].astype(jnp.float32)
    mask = (batch["valid"] >= 0.5) & (jnp.linalg.norm(batch["flow"], axis=-1) < max_flow)
    mask = mask.astype(jnp.float32)[..., None]
    return jnp.sum(mask * jnp.abs(final - batch["flow"])) / jnp.maximum(2.0 * jnp.sum(mask), 1.0)


@register_task
@dataclasses.dataclass(frozen=True)
class Flow(Task):
    """RAFT-style supervised optical flow (see the module docstring)."""

    name: str = "flow"
    selection_metric: str = "epe"
    selection_mode: str = "min"
    gamma: float = SEQUENCE_GAMMA
    max_flow: float = MAX_FLOW

    @classmethod
    def from_config(cls, config) -> Flow:
        """The sequence loss's gamma is the run's ``data.loss_gamma`` (0.85 in RAFT's fine-tuning stages)."""
        data = getattr(config, "data", None)
        return cls(gamma=data.loss_gamma) if isinstance(data, FlowDataConfig) else cls()

    def startup_notes(self, config) -> list[str]:
        if config.method == "hkt" and config.hkt.inherit_loss == "seq":
            return [
                "L1/L3 are RAFT's sequence loss on the backbone and head streams, where the paper says MAE "
                "(hkt.inherit_loss=mae: mean |final flow - gt|)"
            ]
        return []

    # -- data and models ------------------------------------------------------------------------

    def make_datasets(
        self, data_config, *, global_batch_size, seed, process_index=None, process_count=None
    ) -> FlowDatasets:
        if not isinstance(data_config, FlowDataConfig):
            raise ValueError(
                "task='flow' needs data=FlowDataConfig(...) (hkt_jax.tasks.flow_data), got "
                f"{type(data_config).__name__}; see experiments/configs/flow_*.py"
            )
        return FlowDatasets(
            data_config,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def model_kwargs(self, datasets):
        return {"iters": datasets.iters}

    def example_input(self, datasets, batch_size: int = 2):
        shape = (min(batch_size, TIMING_BATCH), *datasets.frame_shape, 3)
        return {"image1": jnp.zeros(shape, jnp.float32), "image2": jnp.zeros(shape, jnp.float32)}

    def model_input(self, batch):
        return {"image1": batch["image1"], "image2": batch["image2"]}

    # -- losses ---------------------------------------------------------------------------------

    def task_loss(self, outputs, batch):
        return sequence_loss(outputs, batch["flow"], batch["valid"], gamma=self.gamma, max_flow=self.max_flow)

    def inherit_loss_table(self) -> dict[str, LossFn]:
        """ "seq": RAFT's sequence loss; "mae": the paper's mean |final flow - gt|."""
        return {"seq": self.task_loss, "mae": functools.partial(final_flow_mae, max_flow=self.max_flow)}

    def distill_loss(self, student, teacher, batch, *, temperature, weight):
        """DRAFT-style: (1 - weight) x sequence loss against the ground truth + weight x sequence loss against
        the frozen parent's final flow (dense: every pixel counts, flows over 400 px ignored). The
        temperature has no meaning for regression and is ignored."""
        del temperature
        ground_truth = self.task_loss(student, batch)
        parent_flow = jax.lax.stop_gradient(teacher[-1].astype(jnp.float32))
        distill = sequence_loss(
            student, parent_flow, jnp.ones_like(batch["valid"]), gamma=self.gamma, max_flow=self.max_flow
        )
        return (1.0 - weight) * ground_truth + weight * distill, {"l2": ground_truth, "l3": distill}

    # -- metrics --------------------------------------------------------------------------------

    def train_metrics(self, outputs, batch):
        """EPE and 1/3/5-px accuracy of the final flow over the batch's valid pixels (as RAFT logs them)."""
        mask = (batch["valid"] >= 0.5) & (jnp.linalg.norm(batch["flow"], axis=-1) < self.max_flow)
        mask = mask.astype(jnp.float32)
        count = jnp.maximum(jnp.sum(mask), 1.0)
        epe = end_point_error(outputs[-1], batch["flow"])
        metrics = {"epe": jnp.sum(mask * epe) / count}
        for threshold in (1, 3, 5):
            metrics[f"{threshold}px"] = jnp.sum(mask * (epe < threshold)) / count
        return metrics

    def eval_sums(self, outputs, batch):
        per_example = flow_metric_sums(outputs[-1], batch["flow"], batch["valid"] * batch["mask"][:, None, None])
        sums = {key: jnp.sum(value) for key, value in per_example.items()}
        has_pixels = per_example["count"] > 0
        sums["image_epe"] = jnp.sum(
            jnp.where(has_pixels, per_example["epe"] / jnp.maximum(per_example["count"], 1), 0.0)
        )
        sums["images"] = jnp.sum(has_pixels.astype(jnp.float32))
        return sums

    def finish_eval(self, sums):
        """EPE over all valid pixels; ``epe_per_image`` = mean of per-image EPEs (KITTI); accuracies as
        fractions; ``f1`` in percent (KITTI's F1-all)."""
        count = float(sums["count"])
        if count == 0:
            raise ValueError("flow evaluation saw no valid pixels")
        metrics = {"epe": float(sums["epe"]) / count}
        for threshold in (1, 3, 5):
            metrics[f"{threshold}px"] = float(sums[f"{threshold}px"]) / count
        metrics["f1"] = 100.0 * float(sums["f1"]) / count
        metrics["epe_per_image"] = float(sums["image_epe"]) / max(float(sums["images"]), 1.0)
        return metrics

    def images_to_log(self, outputs, batch, count: int = 4):
        """Rows of [frame 1 | ground truth | prediction] (flows in the Middlebury colour wheel, both scaled
        by the ground truth's largest valid magnitude)."""
        predicted = np.asarray(outputs[-1][:count], np.float32)
        target = np.asarray(batch["flow"][:count], np.float32)
        valid = np.asarray(batch["valid"][:count]) >= 0.5
        rows = []
        for frame, gt, flow, known in zip(np.asarray(batch["image1"][:count]), target, predicted, valid):
            radius = float(np.max(np.linalg.norm(gt, axis=-1)[known], initial=0.0)) or None
            gt_color = flow_to_color(np.where(known[..., None], gt, 0.0), radius)
            frame = np.clip(frame, 0, 255).astype(np.uint8)
            rows.append(np.concatenate([frame, gt_color, flow_to_color(flow, radius)], axis=1))
        return {"frame1_gt_prediction": np.concatenate(rows, axis=0)}

    def describe_data(self, datasets) -> str:
        return datasets.describe()
