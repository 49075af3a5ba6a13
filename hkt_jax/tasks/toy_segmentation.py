"""A toy per-pixel task on synthetic images: which pixels belong to the bright square?

Why: the training core must serve tasks other than classification. This one is
small enough for unit tests (16x16 images, two classes per pixel) and
exercises everything a dense task needs: per-pixel losses for L1/L2/L3, pixel
accuracy and Dice as eval sums, best model by validation Dice, mask images
worth logging.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.data.arrays import ArrayDatasets
from hkt_jax.tasks.base import Batch, LossFn, Task
from hkt_jax.tasks.registry import register_task

NUM_CLASSES = 2


def make_squares(num: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """Noisy images with one brighter axis-aligned square each; ``segmentation`` marks it."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.5, (num, size, size, 3)).astype(np.float32)
    masks = np.zeros((num, size, size), np.int32)
    for i in range(num):
        side = rng.integers(size // 4, size // 2 + 1)
        y, x = rng.integers(0, size - side + 1, 2)
        masks[i, y : y + side, x : x + side] = 1
    images += masks[..., None] * rng.uniform(0.8, 1.2, (num, 1, 1, 3)).astype(np.float32)
    return {"image": images, "segmentation": masks}


def pixel_ce(logits: jax.Array, batch: Batch) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["segmentation"]).mean()


def pixel_mae(logits: jax.Array, batch: Batch) -> jax.Array:
    """The paper's MAE, per pixel: mean |softmax - one_hot| over pixels and classes."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.abs(probs - jax.nn.one_hot(batch["segmentation"], logits.shape[-1])))


INHERIT_LOSSES = {"mae": pixel_mae, "ce": pixel_ce}


@register_task
@dataclasses.dataclass(frozen=True)
class ToySegmentation(Task):
    """Batches ``{"image": (B, S, S, 3), "segmentation": (B, S, S) int}``; best model by validation Dice."""

    name: str = "toy_segmentation"
    selection_metric: str = "dice"
    selection_mode: str = "max"
    image_size: int = 16

    def make_datasets(
        self, data_config, *, global_batch_size, seed, process_index=None, process_count=None
    ) -> ArrayDatasets:
        sizes = {
            "train": data_config.synthetic_train_size,
            "validation": data_config.validation_size,
            "test": data_config.synthetic_test_size,
        }
        base = data_config.synthetic_seed
        splits = {
            name: make_squares(n, self.image_size, base * 3 + k) for k, (name, n) in enumerate(sizes.items()) if n > 0
        }
        return ArrayDatasets(
            splits,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            num_classes=NUM_CLASSES,
            image_shape=(self.image_size, self.image_size, 3),
        )

    def model_kwargs(self, datasets):
        return {"num_classes": NUM_CLASSES}

    def example_input(self, datasets, batch_size: int = 2):
        return jnp.zeros((batch_size, self.image_size, self.image_size, 3), jnp.float32)

    def task_loss(self, outputs, batch):
        return pixel_ce(outputs, batch)

    def inherit_loss_table(self) -> dict[str, LossFn]:
        return INHERIT_LOSSES

    def train_metrics(self, outputs, batch):
        return {"pixel_accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["segmentation"])}

    def eval_sums(self, outputs, batch):
        mask = batch["mask"][:, None, None]
        predicted = jnp.argmax(outputs, -1)
        target = batch["segmentation"]
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), target)
        hit, fg_pred, fg_true = (predicted == target), (predicted == 1), (target == 1)
        return {
            "correct": jnp.sum(hit * mask),
            "pixels": jnp.sum(jnp.ones_like(hit) * mask),
            "loss": jnp.sum(loss * mask),
            "intersection": jnp.sum(fg_pred * fg_true * mask),
            "predicted": jnp.sum(fg_pred * mask),
            "actual": jnp.sum(fg_true * mask),
        }

    def finish_eval(self, sums):
        pixels = float(sums["pixels"])
        denominator = float(sums["predicted"]) + float(sums["actual"])
        return {
            "pixel_accuracy": float(sums["correct"]) / pixels,
            "loss": float(sums["loss"]) / pixels,
            "dice": 2 * float(sums["intersection"]) / denominator if denominator else 1.0,
        }

    def images_to_log(self, outputs, batch):
        predicted = np.asarray(jnp.argmax(outputs[:4], -1), np.uint8) * 255
        target = np.asarray(batch["segmentation"][:4], np.uint8) * 255
        strip = np.concatenate([np.concatenate([t, p], axis=1) for t, p in zip(target, predicted)], axis=0)
        return {"target_vs_prediction": np.repeat(strip[..., None], 3, axis=-1)}
