"""Segmentation losses and Dice metrics (LiTS conventions).

Logits are ``(B, H, W, C)``, label maps ``(B, H, W)`` integers in ``[0, C)``.
Batches may carry ``"valid"`` ``(B,)`` (1 real, 0 padding): padded slices then
count nowhere. (``"mask"`` is the label map here, not a padding flag.)

Dice of one region (a set of labels: one class, or LiTS's liver = labels {1, 2},
see ``LITS_REGIONS``) = 2|P and G| / (|P| + |G|). **Empty-mask convention:** when
prediction and ground truth are both empty (|P| + |G| = 0) the Dice is 1 (nothing
to find, nothing found); ground truth empty but something predicted gives 0.

LiTS reports two numbers per region: **Dice per case** - the Dice of each volume,
then the mean over volumes - and **Dice global** - one Dice over all voxels of
all volumes pooled. Both come from the same per-volume sums
(intersection, predicted, target), which add up over batches of slices, so
evaluation never needs a whole volume in memory at once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LossFn = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
SUM_NAMES = ("intersection", "predicted", "target")


def _pixel_weights(batch: dict[str, Any], shape: tuple[int, ...]) -> jax.Array:
    """(B, H, W) weights: 1 everywhere, 0 on slices marked invalid by ``batch["valid"]``."""
    valid = batch.get("valid")
    if valid is None:
        return jnp.ones(shape, jnp.float32)
    return jnp.broadcast_to(jnp.asarray(valid, jnp.float32).reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def cross_entropy(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean pixel-wise softmax cross-entropy against ``batch["mask"]`` (valid pixels only)."""
    labels = batch["mask"]
    weights = _pixel_weights(batch, labels.shape)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(per_pixel * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def soft_dice_loss(
    logits: jax.Array, batch: dict[str, jax.Array], *, include_background: bool = False, smooth: float = 1e-5
) -> jax.Array:
    """1 - mean over classes of the soft Dice (2 sum p g + s) / (sum p + sum g + s).

    Sums run over the whole batch and all pixels (batch Dice, as nnU-Net), so a
    class absent from one slice does not blow up; a class absent from the whole
    batch and predicted nowhere scores 1 through ``smooth``. Background (class 0)
    is left out unless ``include_background``.
    """
    labels = batch["mask"]
    num_classes = logits.shape[-1]
    weights = _pixel_weights(batch, labels.shape)[..., None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * weights
    target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights
    axes = tuple(range(probs.ndim - 1))
    intersection = jnp.sum(probs * target, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    first = 0 if include_background or num_classes == 1 else 1
    return 1.0 - jnp.mean(dice[first:])


def make_segmentation_loss(
    ce_weight: float = 1.0, dice_weight: float = 1.0, *, include_background: bool = False, smooth: float = 1e-5
) -> LossFn:
    """``ce_weight * cross_entropy + dice_weight * soft_dice_loss`` as a ``loss(logits, batch)``."""
    if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
        raise ValueError(
            f"segmentation loss weights must be >= 0 and not both 0, got ce={ce_weight}, dice={dice_weight}"
        )

    def segmentation_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        total = jnp.zeros((), jnp.float32)
        if ce_weight:
            total += ce_weight * cross_entropy(logits, batch)
        if dice_weight:
            total += dice_weight * soft_dice_loss(logits, batch, include_background=include_background, smooth=smooth)
        return total

    return segmentation_loss


segmentation_loss = make_segmentation_loss()


def segmentation_mae(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
    """The paper's MAE for inheritance losses, per pixel: mean |softmax - one_hot| over valid pixels and classes."""
    labels = batch["mask"]
    weights = _pixel_weights(batch, labels.shape)[..., None]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    error = jnp.abs(probs - jax.nn.one_hot(labels, logits.shape[-1])) * weights
    return jnp.sum(error) / jnp.maximum(jnp.sum(weights) * logits.shape[-1], 1.0)


def pixel_kd_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0, valid: jax.Array | None = None
) -> jax.Array:
    """Pixel-wise distillation: T^2 * mean over pixels of KL(softmax(t/T) || softmax(s/T))."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    weights = _pixel_weights({"valid": valid} if valid is not None else {}, kl.shape)
    return temperature**2 * jnp.sum(kl * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# -- Dice metrics ---------------------------------------------------------------------------------


Regions = tuple[tuple[str, tuple[int, ...]], ...]
# LiTS scores the liver with the tumour inside it (labels 1 and 2) and the tumour alone.
LITS_REGIONS: Regions = (("liver", (1, 2)), ("tumour", (2,)))


def class_regions(num_classes: int, names: tuple[str, ...] | None = None) -> Regions:
    """One region per class label: (("0", (0,)), ("1", (1,)), ...) or with ``names``."""
    names = names or tuple(str(c) for c in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} names {names} for {num_classes} classes")
    return tuple((name, (c,)) for c, name in enumerate(names))


def _in_region(xp, label_map, labels: tuple[int, ...]):
    inside = xp.zeros(label_map.shape, bool)
    for label in labels:
        inside = inside | (label_map == label)
    return inside


def dice_sums(
    predictions: jax.Array, labels: jax.Array, regions: Regions, valid: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-example counts ``{"intersection", "predicted", "target"}``, each ``(B, R)``.

    ``predictions`` and ``labels`` are ``(B, ...)`` label maps (argmax of the logits
    for predictions); region r counts the pixels whose label is in ``regions[r][1]``.
    Jit-able (``regions`` static); NumPy inputs are counted in NumPy (int64), so host
    evaluation of whole volumes needs no device. Add them up per volume with ``DiceAccumulator``.
    """
    on_host = all(isinstance(a, np.ndarray) for a in (predictions, labels))
    xp, dtype = (np, np.int64) if on_host else (jnp, jnp.int32)
    sums = {name: [] for name in SUM_NAMES}
    axes = tuple(range(1, np.ndim(labels)))
    for _, region in regions:
        pred, true = _in_region(xp, predictions, region), _in_region(xp, labels, region)
        sums["intersection"].append(xp.sum(pred & true, axis=axes, dtype=dtype))
        sums["predicted"].append(xp.sum(pred, axis=axes, dtype=dtype))
        sums["target"].append(xp.sum(true, axis=axes, dtype=dtype))
    sums = {name: xp.stack(values, axis=-1) for name, values in sums.items()}
    if valid is not None:
        keep = xp.asarray(valid).astype(dtype)[:, None]
        sums = {name: value * keep for name, value in sums.items()}
    return sums


def dice_from_sums(intersection: np.ndarray, predicted: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2 I / (P + T) elementwise, 1.0 where P + T = 0 (both empty)."""
    intersection, predicted, target = (np.asarray(a, np.float64) for a in (intersection, predicted, target))
    denominator = predicted + target
    return np.where(denominator > 0, 2.0 * intersection / np.where(denominator > 0, denominator, 1.0), 1.0)


class DiceAccumulator:
    """Adds up Dice sums per case (volume) over batches; reports LiTS's per-case and global Dice.

    ``add(sums, case_ids)`` takes the per-example sums of ``dice_sums`` (host
    arrays, same ``regions``) and the case each example (slice) belongs to.
    ``result()`` gives, per region: ``dice_per_case/<name>`` (mean over cases of
    each case's Dice) and ``dice_global/<name>`` (one Dice of the pooled sums),
    with the empty-mask convention of this module.
    """

    def __init__(self, regions: Regions):
        self.regions = tuple(regions)
        self._cases: dict[Any, np.ndarray] = {}  # case id -> (3, R) int64 sums

    def add(self, sums: dict[str, Any], case_ids: Any) -> None:
        stacked = np.stack([np.asarray(sums[name], np.int64) for name in SUM_NAMES], axis=1)  # (B, 3, R)
        if stacked.shape[-1] != len(self.regions):
            raise ValueError(f"sums have {stacked.shape[-1]} regions, accumulator has {len(self.regions)}")
        case_ids = np.asarray(case_ids).reshape(-1)
        if len(case_ids) != len(stacked):
            raise ValueError(f"{len(case_ids)} case ids for {len(stacked)} examples")
        for case in np.unique(case_ids).tolist():
            total = stacked[case_ids == case].sum(axis=0)
            self._cases[case] = self._cases.get(case, 0) + total

    def add_volume(self, prediction: np.ndarray, label: np.ndarray, case_id: Any) -> None:
        """A whole predicted volume (any shape) against its label volume."""
        if np.shape(prediction) != np.shape(label):
            raise ValueError(f"case {case_id}: prediction {np.shape(prediction)} and label {np.shape(label)} differ")
        sums = dice_sums(
            np.reshape(np.asarray(prediction), (1, -1)), np.reshape(np.asarray(label), (1, -1)), self.regions
        )
        self.add(sums, [case_id])

    @property
    def num_cases(self) -> int:
        return len(self._cases)

    def per_case(self) -> dict[Any, np.ndarray]:
        """Case id -> (R,) Dice of that case."""
        return {case: dice_from_sums(*sums) for case, sums in self._cases.items()}

    def result(self) -> dict[str, float]:
        if not self._cases:
            raise ValueError("DiceAccumulator: no cases added")
        per_case = np.stack(list(self.per_case().values()))  # (cases, R)
        pooled = dice_from_sums(*sum(self._cases.values()))
        out = {}
        for r, (name, _) in enumerate(self.regions):
            out[f"dice_per_case/{name}"] = float(per_case[:, r].mean())
            out[f"dice_global/{name}"] = float(pooled[r])
        return out
