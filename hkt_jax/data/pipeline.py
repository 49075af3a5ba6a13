"""Image-classification input pipeline (CIFAR-style, channels-last) on the shared train stream.

Order, process slices, resume and padded eval passes are ``hkt_jax.data.stream``'s: position `i` is
train example `permutation(seed, epoch=i // N)[i % N]`, process `p` of `P` builds its `G/P` slice of
each global batch. Crop/flip parameters are drawn from grain's per-step RNG for the whole global
batch, so all processes agree on each global batch, and the work is numpy on whole batches
(grain's per-element maps cost ~40 us/image, too slow for 2 cores).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np

from hkt_jax.data.image_folder import load_image_folder, shared_cifar10_archive
from hkt_jax.data.sources import (
    NUM_CLASSES_BY_NAME,
    SHARED_ARCHIVE_HINT,
    ImageSet,
    TFDSNotInstalled,
    load_cifar_pickle,
    load_tfds,
    make_synthetic,
    open_tfds,
)
from hkt_jax.data.stream import (
    ProcessSlice,
    ShardedEpochs,
    TrainStream,
    padded_passes,
    shuffle_and_augment_seeds,
)

logger = logging.getLogger(__name__)

SOURCES = ("tfds", "image_folder", "cifar_pickle", "synthetic", "auto")

# (mean, std) of [0, 1] pixels per channel.
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # pretrained PyTorch CIFAR ResNets
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # CIFAR-10 train statistics
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

CROP_PADDING = 4
# Fixed, so the held-out validation images do not change with the training seed.
VALIDATION_SPLIT_SEED = 0
# Fixed, so a low-data subset (data.train_per_class) is the same images in every run.
TRAIN_SUBSET_SEED = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What data to read and how to preprocess it (`data.*` in experiment configs).

    `path` is the TFDS data_dir (source "tfds"), the image folder or its
    `.tar.gz` ("image_folder"), or the pickle directory ("cifar_pickle").
    The synthetic source stands in for `name`: it has as many classes.
    "auto" is "tfds" when that data is prepared, else the shared CIFAR-10 archive.
    """

    source: str = "tfds"
    name: str = "cifar10"
    path: str | None = None
    validation_size: int = 5000
    normalization: str = "imagenet"
    augment: bool = True
    class_names: tuple[str, ...] | None = None
    cache_dir: str | None = None
    synthetic_train_size: int = 10_000
    synthetic_test_size: int = 2_000
    synthetic_seed: int = 0
    # Keep only this many training images of each class (after the validation hold-out): a fixed subset,
    # the same for every run seed, for low-data experiments. None = every training image.
    train_per_class: int | None = None

    def __post_init__(self):
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ValueError(f"data.train_per_class must be a positive integer or none, got {self.train_per_class}.")
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: expected one of {SOURCES}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization={self.normalization!r}: expected one of {tuple(NORMALIZATIONS)}.")
        if self.validation_size < 0:
            raise ValueError(f"data.validation_size must be >= 0, got {self.validation_size}.")
        if self.source in ("image_folder", "cifar_pickle") and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path. {SHARED_ARCHIVE_HINT}")


def resolve_auto_source(config: DataConfig) -> DataConfig:
    """Picks prepared TFDS data for source "auto", falling back to the shared CIFAR-10 archive."""
    if config.source != "auto":
        return config
    try:
        open_tfds(config.name, "train", config.path)
        return dataclasses.replace(config, source="tfds")
    except FileNotFoundError as tfds_missing:  # not prepared, or tensorflow-datasets not installed
        archive = shared_cifar10_archive()
        if config.name != "cifar10" or not archive.is_file():
            raise FileNotFoundError(
                f"data.source='auto' found no data: {tfds_missing} (no shared archive at {archive} either)."
            ) from tfds_missing
        not_installed = isinstance(tfds_missing, TFDSNotInstalled)
        why = "cannot be read (tensorflow-datasets is not installed)" if not_installed else "is not prepared"
    logger.warning(
        "data.source=auto: TFDS %s %s; using the shared JPEG-q75 archive %s, "
        "which is lossy (about 10 points lower test accuracy than official CIFAR-10).",
        config.name,
        why,
        archive,
    )
    return dataclasses.replace(config, source="image_folder", path=str(archive))


def load_split(config: DataConfig, split: str, class_names: tuple[str, ...] | None = None) -> ImageSet:
    """Loads the source's own `train` or `test` split (validation is carved out later)."""
    if config.source == "tfds":
        return load_tfds(config.name, split, config.path)
    if config.source == "image_folder":
        return load_image_folder(config.path, split, class_names=class_names, cache_dir=config.cache_dir)
    if config.source == "cifar_pickle":
        return load_cifar_pickle(config.name, split, config.path)
    if config.source != "synthetic":
        raise ValueError(f"data.source={config.source!r} must go through resolve_auto_source first.")
    if config.name not in NUM_CLASSES_BY_NAME:
        raise ValueError(f"data.name={config.name!r}: synthetic data mimics one of {sorted(NUM_CLASSES_BY_NAME)}.")
    size = config.synthetic_train_size if split == "train" else config.synthetic_test_size
    return make_synthetic(split, size, NUM_CLASSES_BY_NAME[config.name], config.synthetic_seed)


def split_train_validation(num_examples: int, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, validation) indices from a fixed-seed permutation."""
    if validation_size >= num_examples:
        raise ValueError(
            f"data.validation_size={validation_size} leaves no training images "
            f"(the train split has {num_examples})."
        )
    permutation = np.random.default_rng(VALIDATION_SPLIT_SEED).permutation(num_examples)
    return np.sort(permutation[validation_size:]), np.sort(permutation[:validation_size])


def per_class_subset(train_indices: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted ``per_class`` training indices of every class, drawn with a fixed seed (independent of the
    run's), so every variant and seed of a low-data grid sees the same images."""
    rng = np.random.default_rng(TRAIN_SUBSET_SEED)
    chosen = []
    for label in np.unique(labels[train_indices]):
        of_class = train_indices[labels[train_indices] == label]
        if len(of_class) < per_class:
            raise ValueError(f"data.train_per_class={per_class}: class {label} has only {len(of_class)} training "
                             "images")
        chosen.append(rng.permutation(of_class)[:per_class])
    return np.sort(np.concatenate(chosen))


def crop_and_flip(images: np.ndarray, offsets_y: np.ndarray, offsets_x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on a batch.

    Crop `i` starts at (offsets_y[i], offsets_x[i]) of the zero-padded image;
    a loop of slice copies beats fancy indexing here by about 3x.
    """
    batch, height, width, channels = images.shape
    pad = CROP_PADDING
    padded = np.zeros((batch, height + 2 * pad, width + 2 * pad, channels), images.dtype)
    padded[:, pad : pad + height, pad : pad + width] = images
    out = np.empty_like(images)
    for i, (y, x) in enumerate(zip(offsets_y.tolist(), offsets_x.tolist())):
        out[i] = padded[i, y : y + height, x : x + width]
    flipped = np.asarray(flips, bool)
    out[flipped] = out[flipped, :, ::-1]
    return out


class _Normalizer:
    """uint8 -> float32 `(x / 255 - mean) / std` as one multiply-add."""

    def __init__(self, normalization: str):
        mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
        self.scale = 1 / (255 * std)
        self.offset = -mean / std

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = images.astype(np.float32)
        out *= self.scale
        out += self.offset
        return out


class _TrainBatchBuilder:
    """Builds this process's slice of global batch `step`, vectorised over the slice.

    The examples come from the shared epoch-wise order (`ShardedEpochs`); crop/flip parameters come
    from grain's per-step RNG and are drawn for the whole global batch, so every process sees the same
    parameters for the same position.
    """

    def __init__(self, split: ImageSet, indices: np.ndarray, normalize: _Normalizer, augment: bool,
                 epochs: ShardedEpochs):
        self._split = split
        self._indices = indices
        self._normalize = normalize
        self._augment = augment
        self._epochs = epochs

    def __call__(self, step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = self._indices[self._epochs.examples(step)]
        images = self._split.images[rows]
        if self._augment:
            span = 2 * CROP_PADDING + 1
            layout = self._epochs.layout
            params = rng.integers((span, span, 2), size=(layout.global_batch_size, 3))
            images = crop_and_flip(images, *params[layout.part].T)
        return {"image": self._normalize(images), "label": self._split.labels[rows]}


class ImageDatasets:
    """The train stream, eval passes and split sizes of one image-classification data configuration
    (a `Datasets`), plus the number of classes, their names and the image shape."""

    def __init__(
        self,
        *,
        train: TrainStream,
        splits: dict[str, tuple[ImageSet, np.ndarray]],
        num_classes: int,
        class_names: tuple[str, ...] | None,
        normalize: _Normalizer,
        layout: ProcessSlice,
    ):
        self.train = train
        self.num_classes = num_classes
        self.class_names = class_names
        self.num_train = len(splits["train"][1])
        self.num_validation = len(splits["validation"][1])
        self.num_test = len(splits["test"][1])
        self.image_shape = tuple(splits["train"][0].images.shape[1:])
        self._splits = splits
        self._normalize = normalize
        self._layout = layout

    def eval_batches(self, split: str, *, global_batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """One pass over `validation` or `test` in fixed order.

        The last global batch is padded; `mask` is 1 for real images, so
        summing `mask * correct` over all processes counts each image once.
        Every process yields the same number of batches.
        """
        if split not in ("validation", "test"):
            raise ValueError(f"eval split must be 'validation' or 'test', got {split!r}.")
        image_set, indices = self._splits[split]
        if len(indices) == 0:
            raise ValueError(f"No {split} split: data.validation_size is 0.")
        layout = self._layout
        if global_batch_size:
            layout = ProcessSlice(global_batch_size, layout.process_index, layout.process_count)

        def build(rows: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
            rows = indices[rows]
            images = self._normalize(image_set.images[rows])
            images[~mask] = 0
            labels = np.where(mask, image_set.labels[rows], 0).astype(np.int32)
            return {"image": images, "label": labels, "mask": mask.astype(np.float32)}

        return padded_passes(len(indices), layout, build)


def _infer_num_classes(config: DataConfig, train: ImageSet, test: ImageSet) -> int:
    if train.class_names is not None:
        return len(train.class_names)
    if config.name in NUM_CLASSES_BY_NAME:
        return NUM_CLASSES_BY_NAME[config.name]
    return int(max(train.labels.max(), test.labels.max())) + 1


def make_datasets(
    data_config: DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> ImageDatasets:
    """Loads the data and builds this process's train stream and eval passes.

    Batches are `{"image": float32 (b, H, W, C), "label": int32 (b,)}` with
    `b = global_batch_size / process_count`; eval batches add `"mask"`.
    """
    layout = ProcessSlice.of(global_batch_size, process_index, process_count)  # checked before any loading
    data_config = resolve_auto_source(data_config)
    train_source = load_split(data_config, "train", data_config.class_names)
    test_source = load_split(data_config, "test", train_source.class_names or data_config.class_names)
    if data_config.validation_size:
        train_indices, validation_indices = split_train_validation(len(train_source), data_config.validation_size)
    else:
        train_indices, validation_indices = np.arange(len(train_source)), np.arange(0)
    if data_config.train_per_class is not None:
        train_indices = per_class_subset(train_indices, train_source.labels, data_config.train_per_class)
    num_classes = _infer_num_classes(data_config, train_source, test_source)
    for image_set in (train_source, test_source):
        if image_set.labels.max() >= num_classes:
            raise ValueError(f"Label {image_set.labels.max()} is out of range for {num_classes} classes.")

    normalize = _Normalizer(data_config.normalization)
    shuffle_seed, augment_seed = shuffle_and_augment_seeds(seed)
    epochs = ShardedEpochs(len(train_indices), shuffle_seed, layout)
    builder = _TrainBatchBuilder(train_source, train_indices, normalize, data_config.augment, epochs)
    fingerprint = {"seed": seed, "global_batch_size": global_batch_size, "num_train": len(train_indices)}
    return ImageDatasets(
        train=TrainStream.of_steps(builder, fingerprint=fingerprint, rng_seed=augment_seed),
        splits={
            "train": (train_source, train_indices),
            "validation": (train_source, validation_indices),
            "test": (test_source, np.arange(len(test_source))),
        },
        num_classes=num_classes,
        class_names=train_source.class_names,
        normalize=normalize,
        layout=layout,
    )
