"""Semantic segmentation of CT slices (the paper's LiTS experiment): U-Net parent -> PocketNet child.

Batches are ``{"image": (B, H, W, C) in [0, 1], "mask": (B, H, W) int labels}``;
evaluation batches add ``"valid"`` (1 real slice, 0 padding) and ``"case"``
(the volume each slice belongs to, one-hot, ``(B, cases of the split)``), so
the eval sums can be added up per volume and finished into LiTS's two numbers:
**Dice per case** (mean over volumes of each volume's Dice) and **Dice global**
(all voxels pooled) - see ``hkt_jax.tasks.seg_metrics`` for the empty-mask convention.
They are counted on the slices as the network sees them (``seg.slice_size``);
``experiments.segment_volume`` scores a volume at its own voxel grid.
The best model is the one with the highest validation liver Dice per case
(``"dice"``; with other than 3 classes: foreground = every label > 0).

Settings (``seg.*``, ``SegSettings``, the config's ``task_settings``): HU window, slice size, classes, loss
weights, sampling and the splits by case. HKT's default wiring for a U-Net pair
(bottom features after encoder and bottleneck) is the model's ``hkt_boundaries``.
Data (``data.source``): ``synthetic`` writes synthetic NIfTI cases in the LiTS
layout once into a cache directory; ``lits`` reads the LiTS layout at
``data.path`` (``volume-N.nii[.gz]`` / ``segmentation-N.nii[.gz]``);
``png_folder`` reads 2D PNG pairs there (``images/NAME.png`` with
``masks/NAME.png``); ``image_folder`` takes whichever of the two is there.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.runtime import paths
from hkt_jax.tasks import seg_metrics
from hkt_jax.data import DataConfig, volumes
from hkt_jax.tasks.base import Batch, LossFn, Task
from hkt_jax.tasks.registry import register_task
from hkt_jax.data.synthetic_ct import SyntheticCTConfig, write_synthetic_lits
from hkt_jax.data.stream import ProcessSlice

DATA_SOURCES = ("synthetic", "lits", "png_folder", "image_folder")  # data.source values this task reads
PNG_LAYOUT = "images/NAME.png with a label map masks/NAME.png"
# Overlay colours per label (background keeps the grey image): liver green, tumour red, then others.
LABEL_COLOURS = np.array([[0, 0, 0], [0, 200, 0], [230, 0, 0], [0, 120, 255], [255, 200, 0]], np.float32)


@dataclasses.dataclass(frozen=True)
class SegSettings:
    """``seg.*`` (the config's ``task_settings``): what a segmentation run needs beyond the shared
    data/optim/train settings."""

    window: tuple[float, float] = volumes.DEFAULT_WINDOW  # HU window mapped to [0, 1]
    slice_size: int | None = None  # resize slices to this square size (None: native size)
    num_classes: int = 3  # 3 = LiTS labels (background, liver, tumour)
    ce_weight: float = 1.0  # task loss = ce_weight * CE + dice_weight * soft Dice
    dice_weight: float = 1.0
    foreground_fraction: float | None = 0.5  # share of training draws from slices with foreground
    augment: bool = True  # random flips and 90-degree rotations of training slices
    validation_cases: int = 2  # volumes held out for validation (best-model selection) ...
    test_cases: int = 2  # ... and for the final test (the splits are by volume ...
    split_seed: int = 0  # ... and seeded by this, not by train.seed: every run of a comparison sees the same split)
    store_float16: bool = False  # keep slices as float16 in memory (LiTS at 256^2: ~7.6 GB instead of 15)
    synthetic_cases: int = 8  # data.source=synthetic: number of volumes written ...
    synthetic_shape: tuple[int, int, int] = (64, 64, 24)  # ... and their (x, y, slices) shape

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"seg.num_classes must be >= 2, got {self.num_classes}")
        if self.validation_cases < 0 or self.test_cases < 1:
            raise ValueError(
                f"seg.validation_cases must be >= 0 and seg.test_cases >= 1, got "
                f"{self.validation_cases} and {self.test_cases}"
            )
        seg_metrics.make_segmentation_loss(self.ce_weight, self.dice_weight)  # checks the weights

    @property
    def regions(self) -> seg_metrics.Regions:
        """Scored label sets; the first one selects the best model."""
        if self.num_classes == 3:
            return seg_metrics.LITS_REGIONS
        foreground = (("foreground", tuple(range(1, self.num_classes))),)
        return foreground + (seg_metrics.class_regions(self.num_classes)[1:] if self.num_classes > 2 else ())


# -- data -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegDataConfig(DataConfig):
    """``data.*`` of a segmentation run: ``source`` one of ``DATA_SOURCES``, ``path`` the dataset folder
    (unused for ``synthetic``); slicing, windowing and splits are ``seg.*``."""

    source: str = "synthetic"
    name: str = "synthetic_ct"

    def __post_init__(self):
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r}: a segmentation run reads one of {DATA_SOURCES}")
        if self.source != "synthetic" and not self.path:
            layout = {"lits": "volume-N.nii[.gz] with segmentation-N.nii[.gz]", "png_folder": PNG_LAYOUT}
            raise ValueError(
                f"data.source={self.source!r} needs data.path: a folder of "
                f"{layout.get(self.source, 'LiTS volumes or PNG pairs')}"
            )


def synthetic_lits_dir(settings: SegSettings, seed: int, cache_dir: str | None = None) -> Path:
    """Synthetic cases in the LiTS layout, written once (atomically) into the data cache."""
    shape = "x".join(map(str, settings.synthetic_shape))
    name = f"synthetic_lits-{settings.synthetic_cases}cases-{shape}-seed{seed}"
    root = Path(cache_dir or paths.data_cache_dir()) / name
    if (root / "complete").exists():
        return root

    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    write_synthetic_lits(
        partial, settings.synthetic_cases, seed=seed, config=SyntheticCTConfig(shape=tuple(settings.synthetic_shape))
    )
    (partial / "complete").touch()
    try:
        partial.rename(root)
    except OSError:  # another process got there first: its copy is identical
        shutil.rmtree(partial, ignore_errors=True)
    return root


def load_slices(data_config: Any, settings: SegSettings) -> volumes.SliceSet:
    """Every slice of every case the data config names (see the module docstring)."""
    if data_config.source not in DATA_SOURCES:
        raise ValueError(
            f"data.source={data_config.source!r}: the segmentation task reads {DATA_SOURCES} "
            "(lits = a LiTS NIfTI folder, png_folder = images/ + masks/ PNG pairs at data.path, "
            "image_folder = either)"
        )
    storage = np.float16 if settings.store_float16 else np.float32
    if data_config.source == "synthetic":
        root = synthetic_lits_dir(settings, data_config.synthetic_seed, data_config.cache_dir)
    else:
        root = Path(data_config.path)
        is_png = (root / "images").is_dir() and (root / "masks").is_dir()
        if data_config.source == "png_folder" and not is_png:
            raise ValueError(f"data.source=png_folder: {root} does not hold images/ and masks/ (expected {PNG_LAYOUT})")
        if data_config.source != "lits" and is_png:
            return volumes.load_png_pairs(root, num_classes=settings.num_classes, size=settings.slice_size)
    return volumes.load_lits_slices(
        volumes.find_lits_cases(root),
        num_classes=settings.num_classes,
        window=settings.window,
        size=settings.slice_size,
        storage_dtype=storage,
    )


class SegDatasets:
    """A ``Datasets`` of CT slices, split by volume: eval batches carry one-hot case ids (``case``) and mark
    real slices with ``valid``; plus ``image_shape`` and ``num_cases`` per split."""

    def __init__(
        self,
        slices: volumes.SliceSet,
        settings: SegSettings,
        *,
        global_batch_size: int,
        seed: int,
        split_seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self._layout = ProcessSlice.of(global_batch_size, process_index, process_count)
        rest, test_ids = volumes.split_by_case(slices.case_ids, settings.test_cases, seed=split_seed)
        train_ids, validation_ids = volumes.split_by_case(rest, settings.validation_cases, seed=split_seed + 1)
        self.splits = {"train": volumes.select_cases(slices, train_ids), "test": volumes.select_cases(slices, test_ids)}
        if validation_ids:
            self.splits["validation"] = volumes.select_cases(slices, validation_ids)
        self.train = volumes.make_train_stream(
            self.splits["train"],
            global_batch_size=global_batch_size,
            seed=seed,
            foreground_fraction=settings.foreground_fraction,
            augment_slices=settings.augment,
            process_index=self._layout.process_index,
            process_count=self._layout.process_count,
        )
        self.num_train = len(self.splits["train"])
        self.num_validation = len(self.splits["validation"]) if validation_ids else 0
        self.num_test = len(self.splits["test"])
        self.image_shape = tuple(slices.images.shape[1:])
        self.num_cases = {name: len(split.case_ids) for name, split in self.splits.items()}

    def eval_batches(self, split: str) -> Iterator[Batch]:
        if split not in self.splits:
            raise ValueError(f"no {split!r} split in this data (seg.validation_cases=0?)")
        cases = self.num_cases[split]
        for batch in volumes.eval_batches(
            self.splits[split],
            global_batch_size=self._layout.global_batch_size,
            process_index=self._layout.process_index,
            process_count=self._layout.process_count,
        ):
            batch["case"] = np.eye(cases, dtype=np.int32)[batch["case"]]
            yield batch


# -- images ----------------------------------------------------------------------------------------


def overlay(image: np.ndarray, labels: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the grey image (first channel, [0, 1]) with labels > 0 tinted by ``LABEL_COLOURS``."""
    grey = np.repeat(np.clip(np.asarray(image, np.float32)[..., :1], 0, 1) * 255.0, 3, axis=-1)
    labels = np.asarray(labels, np.int64)
    colours = LABEL_COLOURS[np.minimum(labels, len(LABEL_COLOURS) - 1)]
    tinted = np.where((labels > 0)[..., None], (1 - opacity) * grey + opacity * colours, grey)
    return tinted.round().astype(np.uint8)


# -- the task ---------------------------------------------------------------------------------------


def _case_sum_key(case: int, name: str, region: int) -> str:
    return f"case{case}/{name}/{region}"


@register_task
@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """Per-pixel classes of CT slices (module docstring); ``settings`` = the run's ``seg.*``."""

    name: str = "segmentation"
    selection_metric: str = "dice"
    selection_mode: str = "max"
    settings_type = SegSettings
    settings_key = "seg"
    settings: SegSettings = SegSettings()

    # -- data and models --

    def make_datasets(
        self, data_config, *, global_batch_size, seed, process_index=None, process_count=None
    ) -> SegDatasets:
        return SegDatasets(
            load_slices(data_config, self.settings),
            self.settings,
            global_batch_size=global_batch_size,
            seed=seed,
            split_seed=self.settings.split_seed,
            process_index=process_index,
            process_count=process_count,
        )

    def model_kwargs(self, datasets) -> dict[str, Any]:
        return {"num_classes": self.settings.num_classes, "in_channels": datasets.image_shape[-1]}

    def example_input(self, datasets, batch_size: int = 2):
        return jnp.zeros((batch_size, *datasets.image_shape), jnp.float32)

    # -- losses --

    def task_loss(self, outputs, batch):
        return seg_metrics.make_segmentation_loss(self.settings.ce_weight, self.settings.dice_weight)(outputs, batch)

    def inherit_loss_table(self) -> dict[str, LossFn]:
        """ "mae": the paper's per-pixel MAE; "ce": the segmentation loss itself (CE + soft Dice)."""
        return {"mae": seg_metrics.segmentation_mae, "ce": self.task_loss}

    def distill_loss(self, student, teacher, batch, *, temperature, weight):
        """(1 - weight) * segmentation loss + weight * pixel-wise KD on the parent's logits."""
        task = self.task_loss(student, batch)
        kd = seg_metrics.pixel_kd_loss(student, teacher, temperature=temperature, valid=batch.get("valid"))
        return (1.0 - weight) * task + weight * kd, {"l2": task, "l3": kd}

    # -- metrics --

    def train_metrics(self, outputs, batch):
        predicted = jnp.argmax(outputs, -1)
        sums = seg_metrics.dice_sums(predicted, batch["mask"], self.settings.regions[:1])
        total = {name: jnp.sum(value) for name, value in sums.items()}
        denominator = total["predicted"] + total["target"]
        dice = jnp.where(denominator > 0, 2.0 * total["intersection"] / jnp.maximum(denominator, 1), 1.0)
        return {"pixel_accuracy": jnp.mean(predicted == batch["mask"]), "dice": dice}

    def eval_sums(self, outputs, batch):
        """Loss and pixel sums over real slices, plus Dice counts per (case, region) as scalars
        ``case{k}/{intersection|predicted|target}/{region}`` (integers; summed over batches). That is
        3 x regions scalars per volume of the split: right for tens of CT volumes, heavy for a PNG set of
        thousands of images (each image is a case there)."""
        valid = batch["valid"]
        labels = batch["mask"]
        predicted = jnp.argmax(outputs, -1)
        pixel_weight = valid[:, None, None]
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), labels)
        sums = {
            "loss": jnp.sum(ce * pixel_weight),
            "correct": jnp.sum((predicted == labels) * pixel_weight),
            "pixels": jnp.sum(jnp.ones_like(ce) * pixel_weight),
        }
        counts = seg_metrics.dice_sums(predicted, labels, self.settings.regions, valid)  # each (B, R)
        cases = batch["case"].astype(jnp.int32)  # (B, K) one-hot
        for name, value in counts.items():
            per_case = cases.T @ value.astype(jnp.int32)  # (K, R)
            for k in range(per_case.shape[0]):
                for r in range(per_case.shape[1]):
                    sums[_case_sum_key(k, name, r)] = per_case[k, r]
        return sums

    def finish_eval(self, sums):
        regions = self.settings.regions
        cases = sorted({int(key.split("/")[0][4:]) for key in sums if key.startswith("case")})
        accumulator = seg_metrics.DiceAccumulator(regions)
        arrays = {
            name: np.array([[int(sums[_case_sum_key(k, name, r)]) for r in range(len(regions))] for k in cases])
            for name in seg_metrics.SUM_NAMES
        }
        accumulator.add(arrays, cases)
        result = accumulator.result()
        pixels = float(sums["pixels"])
        return {
            "dice": result[f"dice_per_case/{regions[0][0]}"],
            **result,
            "pixel_accuracy": float(sums["correct"]) / pixels,
            "loss": float(sums["loss"]) / pixels,
        }

    def images_to_log(self, outputs, batch):
        """Up to 4 slices side by side: image | ground truth | prediction."""
        predicted = np.asarray(jnp.argmax(outputs[:4], -1))
        images, labels = np.asarray(batch["image"][:4]), np.asarray(batch["mask"][:4])
        rows = [
            np.concatenate([overlay(i, np.zeros_like(m)), overlay(i, m), overlay(i, p)], axis=1)
            for i, m, p in zip(images, labels, predicted)
        ]
        return {"image_truth_prediction": np.concatenate(rows, axis=0)}

    def describe_data(self, datasets) -> str:
        cases = ", ".join(f"{n} {split}" for split, n in datasets.num_cases.items())
        return (
            f"{'x'.join(map(str, datasets.image_shape))} slices of volumes ({cases}); "
            + super().describe_data(datasets)
            + " (slices)"
        )
