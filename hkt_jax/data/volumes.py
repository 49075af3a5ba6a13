"""Segmentation data: LiTS NIfTI volumes and PNG image/mask pairs as 2D slices.

LiTS layout: ``volume-N.nii[.gz]`` (CT in Hounsfield units) next to
``segmentation-N.nii[.gz]`` (0 background, 1 liver, 2 tumour), read with
nibabel in the files' own voxel order. An axial slice is ``volume[:, :, k]``
(H = first voxel axis, W = second), so predictions go back into the input
volume, and its affine and header, without reorientation.

Preprocessing: HU window (default [-200, 250]) scaled to [0, 1], then an
optional resize (half-pixel bilinear for images - a 2x reduction is then the
mean of each 2x2 block - nearest for masks). Every problem with an input -
unreadable file, not 3D, volume/mask shapes or affines that differ, labels
outside the declared classes - is a ValueError naming the file.

Slices of all cases are held by a ``SliceSet`` (a random-access source grain
can read); the validation split is made **by case**, so no volume has slices
on both sides. Training batches come from ``make_train_stream``, on the shared
stream (``hkt_jax.data.stream``): global batch ``s`` is drawn from grain's per-step
RNG (foreground-weighted slice choice, then flips / 90-degree rotations), so
the iterator state is just the step and resume is exact.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hkt_jax.data.stream import ProcessSlice, TrainStream, padded_passes

LITS_CLASSES = ("background", "liver", "tumour")
DEFAULT_WINDOW = (-200.0, 250.0)
_LITS_NAME = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")


# -- reading and checking -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    case_id: str
    image_path: Path
    mask_path: Path


def find_lits_cases(root: str | Path) -> list[Case]:
    """Every ``volume-N`` with its ``segmentation-N`` under ``root``, by N; a volume without one is an error."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (expected LiTS volume-N.nii[.gz] / segmentation-N.nii[.gz])")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in root.iterdir():
        match = _LITS_NAME.match(path.name)
        if match:
            kind, number = match.group(1), int(match.group(2))
            if number in found[kind]:
                raise ValueError(f"{path}: case {number} also exists as {found[kind][number]}")
            found[kind][number] = path
    for number, path in found["volume"].items():
        if number not in found["segmentation"]:
            raise ValueError(f"{path}: no segmentation-{number}.nii[.gz] next to it")
    if not found["volume"]:
        raise ValueError(f"{root}: no volume-N.nii[.gz] files")
    return [Case(str(n), found["volume"][n], found["segmentation"][n]) for n in sorted(found["volume"])]


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data with scaling applied, 4x4 affine); any failure is a ValueError naming ``path``."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        affine = np.asarray(image.affine, np.float64)
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error, ...
        raise ValueError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})") from error
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, affine


def check_labels(mask: np.ndarray, num_classes: int, path: Any) -> np.ndarray:
    """``mask`` as uint8 after checking every value is an integer in [0, num_classes)."""
    values = np.unique(mask)
    bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
    if len(bad):
        raise ValueError(f"{path}: labels {bad.tolist()[:10]} outside the {num_classes} declared classes "
                         f"0..{num_classes - 1}")
    return mask.astype(np.uint8)


def load_case(case: Case, num_classes: int = 3, affine_atol: float = 1e-3):
    """(HU volume float32, label volume uint8, affine): shapes, affines and labels checked."""
    image, affine = read_nifti(case.image_path)
    mask, mask_affine = read_nifti(case.mask_path)
    if image.shape != mask.shape:
        raise ValueError(f"{case.mask_path}: shape {mask.shape} differs from {case.image_path} shape {image.shape}")
    if not np.allclose(affine, mask_affine, atol=affine_atol):
        raise ValueError(f"{case.mask_path}: affine differs from {case.image_path} "
                         f"(max difference {np.abs(affine - mask_affine).max():.3g})")
    return image.astype(np.float32), check_labels(mask, num_classes, case.mask_path), affine


# -- preprocessing --------------------------------------------------------------------------------


def window_hu(hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """Clip to [low, high] HU and scale to [0, 1] (float32)."""
    low, high = window
    if not high > low:
        raise ValueError(f"HU window must have high > low, got {window}")
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def _linear_taps(size_in: int, size_out: int):
    """Half-pixel-centre source taps (lower index, upper index, upper weight) for one axis."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    lower = np.floor(source).astype(np.int64)
    return lower, np.minimum(lower + 1, size_in - 1), (source - lower).astype(np.float32)


def resize_linear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the axes -2, -1 (half-pixel centres, no antialias; as torch align_corners=False)."""
    for axis, size_out in ((-2, size[0]), (-1, size[1])):
        lower, upper, weight = _linear_taps(images.shape[axis], size_out)
        shape = [1] * images.ndim
        shape[axis] = size_out
        weight = weight.reshape(shape)
        images = np.take(images, lower, axis=axis) * (1 - weight) + np.take(images, upper, axis=axis) * weight
    return images.astype(np.float32)


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of the axes -2, -1: pixel i reads floor((i + 0.5) * in / out) (torch "nearest-exact")."""
    for axis, size_out in ((-2, size[0]), (-1, size[1])):
        size_in = labels.shape[axis]
        index = np.minimum(np.floor((np.arange(size_out) + 0.5) * size_in / size_out).astype(np.int64), size_in - 1)
        labels = np.take(labels, index, axis=axis)
    return labels


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def volume_to_slices(hu: np.ndarray, window=DEFAULT_WINDOW, size=None) -> np.ndarray:
    """(X, Y, Z) HU volume -> (Z, H, W, 1) model inputs (windowed, resized)."""
    slices = window_hu(np.moveaxis(hu, -1, 0), window)
    size = _as_size(size)
    if size and size != slices.shape[1:]:
        slices = resize_linear(slices, size)
    return slices[..., None]


def slices_to_volume(labels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, h, w) predicted labels -> (X, Y, Z) volume of ``shape`` (nearest resize back)."""
    if labels.shape[1:] != tuple(shape[:2]):
        labels = resize_nearest(labels, shape[:2])
    return np.moveaxis(labels, 0, -1)


# -- slices of many cases -------------------------------------------------------------------------


@dataclasses.dataclass
class SliceSet:
    """Preprocessed 2D slices of several cases, random access by slice index.

    ``images`` (N, H, W, C) in [0, 1], ``masks`` (N, H, W) uint8, ``case_index``
    (N,) into ``case_ids``. ``__getitem__`` makes it a grain data source.
    """

    images: np.ndarray
    masks: np.ndarray
    case_index: np.ndarray
    case_ids: tuple[str, ...]
    num_classes: int

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index].astype(np.float32), "mask": self.masks[index].astype(np.int32),
                "case": np.int32(self.case_index[index])}

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"image": self.images[indices].astype(np.float32), "mask": self.masks[indices].astype(np.int32),
                "case": self.case_index[indices].astype(np.int32)}

    def has_foreground(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).max(axis=1) > 0


def load_lits_slices(cases: Sequence[Case], *, num_classes: int = 3, window=DEFAULT_WINDOW, size=None,
                     storage_dtype=np.float32) -> SliceSet:
    """Every axial slice of ``cases`` (float16 storage halves memory; ~1e-3 rounding)."""
    size = _as_size(size)
    images, masks, case_index = [], [], []
    for number, case in enumerate(cases):
        hu, labels, _ = load_case(case, num_classes)
        if size is None and images and hu.shape[:2] != images[0].shape[1:3]:
            raise ValueError(f"{case.image_path}: slice size {hu.shape[:2]} differs from earlier cases "
                             f"{images[0].shape[1:3]}; give a resize `size`")
        images.append(volume_to_slices(hu, window, size).astype(storage_dtype))
        labels = np.moveaxis(labels, -1, 0)
        masks.append(resize_nearest(labels, size) if size else labels)
        case_index.append(np.full(hu.shape[-1], number, np.int32))
    return SliceSet(np.concatenate(images), np.concatenate(masks), np.concatenate(case_index),
                    tuple(c.case_id for c in cases), num_classes)


def load_png_pairs(root: str | Path, *, num_classes: int, size=None, color: bool = False) -> SliceSet:
    """2D dataset: ``root/images/NAME.png`` with label map ``root/masks/NAME.png``; each pair is one case."""
    from PIL import Image

    root = Path(root)
    image_paths = sorted((root / "images").glob("*.png"))
    if not image_paths:
        raise ValueError(f"{root / 'images'}: no PNG images")
    size = _as_size(size)
    images, masks = [], []
    for image_path in image_paths:
        mask_path = root / "masks" / image_path.name
        if not mask_path.is_file():
            raise ValueError(f"{image_path}: no mask {mask_path}")
        try:
            image = np.asarray(Image.open(image_path).convert("RGB" if color else "L"), np.float32) / 255.0
            mask = np.asarray(Image.open(mask_path))
        except Exception as error:
            raise ValueError(f"{image_path} / {mask_path}: cannot read ({error})") from error
        if mask.ndim != 2 or mask.shape != image.shape[:2]:
            raise ValueError(f"{mask_path}: shape {mask.shape} differs from {image_path} {image.shape[:2]}")
        mask = check_labels(mask, num_classes, mask_path)
        image = image if color else image[..., None]
        if size:
            image, mask = np.moveaxis(resize_linear(np.moveaxis(image, -1, 0), size), 0, -1), resize_nearest(mask, size)
        elif images and image.shape != images[0].shape:
            raise ValueError(f"{image_path}: size {image.shape[:2]} differs from {image_paths[0]}; give `size`")
        images.append(image)
        masks.append(mask)
    return SliceSet(np.stack(images), np.stack(masks), np.arange(len(images), dtype=np.int32),
                    tuple(p.stem for p in image_paths), num_classes)


def split_by_case(case_ids: Sequence[str], validation_size: int | float, seed: int = 0):
    """(train ids, validation ids), disjoint: ``validation_size`` cases (or that fraction), seeded."""
    ids = sorted(case_ids)
    count = round(validation_size * len(ids)) if isinstance(validation_size, float) else int(validation_size)
    if not 0 <= count < len(ids):
        raise ValueError(f"validation_size={validation_size} leaves no training case among {len(ids)}")
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    return ([c for i, c in enumerate(ids) if i not in chosen], [c for i, c in enumerate(ids) if i in chosen])


def select_cases(slice_set: SliceSet, case_ids: Sequence[str]) -> SliceSet:
    """The slices of the named cases only (how the by-case split is applied to a SliceSet)."""
    unknown = sorted(set(case_ids) - set(slice_set.case_ids))
    if unknown:
        raise ValueError(f"cases {unknown} are not in this slice set (it has {len(slice_set.case_ids)} cases)")
    wanted = [slice_set.case_ids.index(c) for c in case_ids]
    rows = np.flatnonzero(np.isin(slice_set.case_index, wanted))
    remap = np.full(len(slice_set.case_ids), -1, np.int32)
    remap[wanted] = np.arange(len(wanted))
    return SliceSet(slice_set.images[rows], slice_set.masks[rows], remap[slice_set.case_index[rows]],
                    tuple(case_ids), slice_set.num_classes)


# -- training stream and evaluation passes --------------------------------------------------------


def sampling_probabilities(has_foreground: np.ndarray, foreground_fraction: float | None) -> np.ndarray:
    """Per-slice probabilities giving ``foreground_fraction`` of the draws to slices with foreground
    (uniform within each group); None, or a set with only one kind of slice, samples uniformly."""
    count = len(has_foreground)
    fg = int(has_foreground.sum())
    if foreground_fraction is None or fg in (0, count):
        return np.full(count, 1.0 / count)
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
    return np.where(has_foreground, foreground_fraction / fg, (1.0 - foreground_fraction) / (count - fg))


def augment(images: np.ndarray, masks: np.ndarray, flips: np.ndarray, rotations: np.ndarray):
    """Per example: flip rows if flips[i, 0], columns if flips[i, 1], then rotate by rotations[i] x 90 degrees."""
    images, masks = images.copy(), masks.copy()
    for i in range(len(images)):
        image, mask = images[i], masks[i]
        if flips[i, 0]:
            image, mask = image[::-1], mask[::-1]
        if flips[i, 1]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        images[i], masks[i] = np.rot90(image, rotations[i]), np.rot90(mask, rotations[i])
    return images, masks


@dataclasses.dataclass(frozen=True)
class _TrainBatchBuilder:
    slice_set: SliceSet
    probabilities: np.ndarray
    augment: bool
    layout: ProcessSlice

    def __call__(self, step: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        del step  # grain's per-step rng already depends on it
        size = self.layout.global_batch_size
        rows = rng.choice(len(self.slice_set), size=size, p=self.probabilities)
        flips = rng.random((size, 2)) < 0.5
        square = self.slice_set.images.shape[1] == self.slice_set.images.shape[2]
        rotations = rng.integers(0, 4, size) if square else 2 * rng.integers(0, 2, size)
        part = self.layout.part
        batch = self.slice_set.batch(rows[part])
        if self.augment:
            batch["image"], batch["mask"] = augment(batch["image"], batch["mask"], flips[part], rotations[part])
        return batch


def make_train_stream(slice_set: SliceSet, *, global_batch_size: int, seed: int,
                      foreground_fraction: float | None = 0.5, augment_slices: bool = True,
                      process_index: int = 0, process_count: int = 1) -> TrainStream:
    """Batches {"image": (b, H, W, C) float32, "mask": (b, H, W) int32, "case": (b,)}, b = global / processes.

    Slices are drawn with replacement (foreground-weighted), not in epochs: grain's per-step RNG, seeded by
    ``seed``, draws the whole global batch and each process keeps its slice.
    """
    layout = ProcessSlice(global_batch_size, process_index, process_count)
    if len(slice_set) == 0:
        raise ValueError("no training slices")
    probabilities = sampling_probabilities(slice_set.has_foreground(), foreground_fraction)
    builder = _TrainBatchBuilder(slice_set, probabilities, augment_slices, layout)
    fingerprint = {"seed": seed, "global_batch_size": global_batch_size, "num_slices": len(slice_set),
                   "foreground_fraction": foreground_fraction, "augment": augment_slices}
    return TrainStream.of_steps(builder, fingerprint=fingerprint, rng_seed=seed)


def eval_batches(slice_set: SliceSet, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every slice once, in order; the last batch padded, ``"valid"`` 1.0 for real slices."""
    layout = ProcessSlice(global_batch_size, process_index, process_count)

    def build(rows: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        batch = slice_set.batch(rows)
        batch["image"][~valid] = 0
        batch["mask"][~valid] = 0
        batch["valid"] = valid.astype(np.float32)
        return batch

    return padded_passes(len(slice_set), layout, build)
