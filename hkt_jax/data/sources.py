"""Dataset sources: each loads one split of a CIFAR-style dataset into memory.

CIFAR is small (60k images of 3 KiB), so every source materialises a split as
numpy arrays once and the pipeline does random access by fancy indexing; this
keeps the hot path free of per-image Python and I/O.  Nothing is read at import.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (32, 32, 3)  # CIFAR: what the CIFAR sources and the synthetic stand-in produce

# Official CIFAR-10 label order (label k is CIFAR10_CLASSES[k]).
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

NUM_CLASSES_BY_NAME = {"cifar10": 10, "cifar100": 100}

SHARED_ARCHIVE_HINT = (
    "For CIFAR-10 offline, set data.source=image_folder and data.path to "
    "<shared data>/cifar10-q75/cifar10-q75-imagefolder.tar.gz; for smoke runs, "
    "data.source=synthetic."
)


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One split in memory: uint8 images (N, 32, 32, 3) and int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] | None = None
    skipped_files: tuple[str, ...] = ()  # unreadable images left out (image folders with skip_unreadable)

    def __len__(self) -> int:
        return len(self.labels)


def checked_image_set(
    images: np.ndarray,
    labels: np.ndarray,
    origin: str,
    class_names: tuple[str, ...] | None = None,
) -> ImageSet:
    """Validates shapes once at load time so the pipeline can trust them."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"{origin}: expected uint8 images of shape (N, height, width, channels), got "
            f"{images.dtype} {images.shape}."
        )
    if labels.shape != (len(images),):
        raise ValueError(
            f"{origin}: expected {len(images)} labels, got shape {labels.shape}."
        )
    if len(labels) == 0:
        raise ValueError(f"{origin}: the split holds no images.")
    if labels.min() < 0:
        raise ValueError(f"{origin}: labels must be non-negative, found {int(labels.min())}.")
    if class_names is not None and labels.max() >= len(class_names):
        raise ValueError(f"{origin}: label {int(labels.max())} is out of range for {len(class_names)} classes "
                         f"{list(class_names)}.")
    return ImageSet(np.ascontiguousarray(images), labels.astype(np.int32), class_names)


def _check_name(name: str, source: str) -> None:
    if name not in NUM_CLASSES_BY_NAME:
        raise ValueError(
            f"data.name={name!r} is not supported by data.source={source!r}; "
            f"use one of {sorted(NUM_CLASSES_BY_NAME)}."
        )


class TFDSNotInstalled(FileNotFoundError):
    """TFDS data cannot be read without the tensorflow-datasets package: to the user, data not found here."""


def open_tfds(name: str, split: str, data_dir: str | None = None):
    """The random-access (ArrayRecord) source of a prepared TFDS dataset.

    `tfds.data_source` works without TensorFlow, but it cannot download or
    prepare data here, so a missing dataset (or a missing tensorflow-datasets
    package) is reported with the ways out.
    """
    _check_name(name, "tfds")
    try:
        import tensorflow_datasets as tfds  # deferred: only this source needs it
    except ImportError as error:  # not in requirements.txt nor on the GPU image
        raise TFDSNotInstalled(
            f"data.source='tfds' needs tensorflow-datasets, which is not installed here ({error}). "
            f"`pip install tensorflow-datasets` or use another data.source. {SHARED_ARCHIVE_HINT}"
        ) from error
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises several unrelated types here
        location = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in {location} "
            f"in array_record format ({type(error).__name__}: {error}). Prepare it "
            f"on a machine with internet access with `tfds build {name} "
            f"--file_format=array_record --data_dir=DIR` and set data.path=DIR, or "
            f"use another data.source. {SHARED_ARCHIVE_HINT}"
        ) from error


def load_tfds(name: str, split: str, data_dir: str | None = None) -> ImageSet:
    """Reads a whole split of a prepared TFDS dataset into memory."""
    records = open_tfds(name, split, data_dir)
    origin = f"tfds {name}/{split} in {data_dir or 'the default data_dir'}"
    if len(records) == 0:
        raise ValueError(f"{origin}: the split holds no images.")
    examples = [records[i] for i in range(len(records))]
    images = np.stack([example["image"] for example in examples])
    labels = np.asarray([example["label"] for example in examples])
    return checked_image_set(images, labels, origin)


_PICKLE_LAYOUT = {
    # name: (directory, train files, test files, label key, class-name key in meta file)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        ("batches.meta", "label_names"),
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", ("meta", "fine_label_names")),
}


def _read_pickle(path: Path) -> dict[str, object]:
    """Official CIFAR pickles are py2 dicts with bytes keys; str keys are accepted too."""
    try:
        with path.open("rb") as file:
            content = pickle.load(file, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({type(error).__name__}: {error}).") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}.")
    return {key.decode() if isinstance(key, bytes) else str(key): value for key, value in content.items()}


def load_cifar_pickle(name: str, split: str, path: str | Path) -> ImageSet:
    """Reads the official python-pickle release (`cifar-10-batches-py` / `cifar-100-python`).

    `path` is that directory or a directory containing it.
    """
    _check_name(name, "cifar_pickle")
    directory_name, train_files, test_files, label_key, (meta_file, names_key) = _PICKLE_LAYOUT[name]
    root = Path(path)
    if not (root / train_files[0]).exists() and (root / directory_name).is_dir():
        root = root / directory_name
    files = {"train": train_files, "test": test_files}.get(split)
    if files is None:
        raise ValueError(f"cifar_pickle has splits 'train' and 'test', not {split!r}.")
    missing = [file_name for file_name in files if not (root / file_name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: missing {missing} — data.path must point to the official "
            f"'{directory_name}' directory (from https://www.cs.toronto.edu/~kriz/"
            f"{'cifar-10-python' if name == 'cifar10' else 'cifar-100-python'}.tar.gz, "
            f"extracted). {SHARED_ARCHIVE_HINT}"
        )
    images, labels = [], []
    for file_name in files:
        batch = _read_pickle(root / file_name)
        if "data" not in batch or label_key not in batch:
            raise ValueError(
                f"{root / file_name}: expected keys 'data' and {label_key!r} "
                f"(official {name} pickle), found {sorted(batch)}."
            )
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{root / file_name}: 'data' must be (N, 3072) uint8, got {data.shape}.")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW rows -> NHWC
        labels.append(np.asarray(batch[label_key]))
    class_names = None
    if (root / meta_file).is_file():
        names = _read_pickle(root / meta_file).get(names_key)
        if names is not None:
            class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return checked_image_set(np.concatenate(images), np.concatenate(labels), str(root), class_names)


def make_synthetic(split: str, num_examples: int, num_classes: int, seed: int = 0) -> ImageSet:
    """Learnable stand-in data: class k is a fixed low-frequency colour pattern plus noise.

    The patterns depend only on (seed, num_classes), so train and test share
    them and a tiny model separates the classes within a few dozen steps.
    """
    if num_examples <= 0:
        raise ValueError(f"synthetic {split} size must be positive, got {num_examples}.")
    pattern_rng = np.random.default_rng([seed, num_classes])
    rows, cols = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
    frequencies = pattern_rng.integers(0, 3, size=(num_classes, 1, 1, 3, 2))
    phases = pattern_rng.uniform(0, 2 * np.pi, size=(num_classes, 1, 1, 3))
    colours = pattern_rng.uniform(-1, 1, size=(num_classes, 1, 1, 3))
    waves = np.cos(
        2 * np.pi * (frequencies[..., 0] * rows[..., None] + frequencies[..., 1] * cols[..., None]) + phases
    )
    patterns = (128 + 45 * colours + 45 * waves).astype(np.float32)

    split_rng = np.random.default_rng([seed, num_classes, 1 if split == "train" else 2])
    labels = split_rng.permutation(np.arange(num_examples) % num_classes)
    noise = split_rng.standard_normal((num_examples, *IMAGE_SHAPE), dtype=np.float32)
    images = np.clip(patterns[labels] + 20 * noise, 0, 255).astype(np.uint8)
    return checked_image_set(images, labels, f"synthetic {split}")
