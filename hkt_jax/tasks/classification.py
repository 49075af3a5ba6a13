"""Image classification: one image in, class logits out (the paper's CIFAR experiment)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hkt_jax.tasks.base import Batch, LossFn, Task
from hkt_jax.tasks.registry import register_task
from hkt_jax.data.pipeline import ImageDatasets, make_datasets


def classification_ce(logits: jax.Array, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy against integer ``batch["label"]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()


def classification_mae(logits: jax.Array, batch: Batch) -> jax.Array:
    """The paper's MAE (Eq. 5, 8) for classifiers: mean over batch and classes of
    |softmax(logits) - one_hot(label)| (as ``torch.nn.L1Loss`` would average it)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.abs(probs - jax.nn.one_hot(batch["label"], logits.shape[-1])))


def hinton_kd(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch (Hinton et al., 2015)."""
    teacher = teacher.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(teacher)
    kl = optax.softmax_cross_entropy(student.astype(jnp.float32) / temperature, probs) - optax.softmax_cross_entropy(
        teacher, probs
    )
    return jnp.mean(kl) * temperature**2


INHERIT_LOSSES = {"mae": classification_mae, "ce": classification_ce}


@register_task
@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """Batches ``{"image": (B, H, W, C) float, "label": (B,) int}``; eval batches add ``"mask"``
    (1 for real images, 0 for padding). Best model: highest validation accuracy."""

    name: str = "classification"
    selection_metric: str = "accuracy"
    selection_mode: str = "max"
    feature_distillation = True

    def make_datasets(
        self, data_config, *, global_batch_size, seed, process_index=None, process_count=None
    ) -> ImageDatasets:
        return make_datasets(
            data_config,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def model_kwargs(self, datasets) -> dict[str, Any]:
        return {"num_classes": datasets.num_classes}

    def example_input(self, datasets, batch_size: int = 2):
        return jnp.zeros((batch_size, *datasets.image_shape), jnp.float32)

    def task_loss(self, outputs, batch):
        return classification_ce(outputs, batch)

    def inherit_loss_table(self) -> dict[str, LossFn]:
        return INHERIT_LOSSES

    def distill_loss(self, student, teacher, batch, *, temperature, weight):
        ce = classification_ce(student, batch)
        kd = hinton_kd(student, teacher, temperature)
        return (1.0 - weight) * ce + weight * kd, {"l2": ce, "l3": kd}

    def train_metrics(self, outputs, batch):
        return {"accuracy": jnp.mean(jnp.argmax(outputs, -1) == batch["label"])}

    def eval_sums(self, outputs, batch):
        logits = outputs.astype(jnp.float32)
        mask = batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    def finish_eval(self, sums):
        count = float(sums["count"])
        return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss"]) / count}

    def describe_data(self, datasets) -> str:
        return (
            f"{datasets.num_classes} classes, {'x'.join(map(str, datasets.image_shape))} images: "
            + super().describe_data(datasets)
        )
