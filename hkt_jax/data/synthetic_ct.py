"""Synthetic abdominal CT volumes in the LiTS layout, written as real NIfTI files.

Each case is an elliptic "body" of soft tissue in air, with a fat rim and a
bony "spine", an ellipsoidal "liver" (label 1) with smooth texture, and a few
smaller hypodense ellipsoidal "lesions" (label 2) inside it, plus Gaussian
noise - in Hounsfield units, stored as int16 like LiTS. Every case gets its
own voxel spacing (in-plane and slice), a small rotation about the axial axis,
axis flips and origin, so readers must carry the affine through. The liver
covers only some of the slices, as in real scans, so foreground-weighted slice
sampling matters. For tests, smoke runs and CPU-scale experiments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from scipy import ndimage

AIR_HU, FAT_HU, TISSUE_HU, BONE_HU = -1000.0, -100.0, 40.0, 700.0


@dataclasses.dataclass(frozen=True)
class SyntheticCTConfig:
    shape: tuple[int, int, int] = (64, 64, 24)  # (x, y, z): axial slices are [:, :, k]
    liver_hu: tuple[float, float] = (50.0, 80.0)  # drawn per case
    lesion_contrast_hu: tuple[float, float] = (-45.0, -20.0)  # lesion minus liver, per lesion
    max_lesions: int = 3
    noise_hu: float = 15.0
    texture_hu: float = 8.0
    in_plane_spacing_mm: tuple[float, float] = (0.6, 0.95)
    slice_spacing_mm: tuple[float, float] = (1.0, 5.0)
    max_rotation_deg: float = 10.0


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, semi_axes) -> np.ndarray:
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes)) <= 1.0


def random_affine(rng: np.random.Generator, config: SyntheticCTConfig) -> np.ndarray:
    """4x4 voxel -> world (mm) affine: flips, rotation about z, per-case spacing and origin."""
    spacing = np.array([*(rng.uniform(*config.in_plane_spacing_mm),) * 2, rng.uniform(*config.slice_spacing_mm)])
    angle = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flips = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ flips @ np.diag(spacing)
    affine[:3, 3] = rng.uniform(-200, 200, size=3)
    return affine.astype(np.float32).astype(np.float64)  # NIfTI stores float32: round trips exactly


def synthetic_case(rng: np.random.Generator, config: SyntheticCTConfig = SyntheticCTConfig()):
    """One case: (volume int16 HU, labels uint8 in {0, 1, 2}, affine float64 4x4)."""
    sx, sy, sz = config.shape
    grid = np.meshgrid(np.linspace(-1, 1, sx), np.linspace(-1, 1, sy), np.linspace(-1, 1, sz), indexing="ij")
    x, y, _ = grid
    body_axes = (rng.uniform(0.8, 0.95), rng.uniform(0.6, 0.8))
    body = (x / body_axes[0]) ** 2 + (y / body_axes[1]) ** 2 <= 1.0
    inner = (x / (body_axes[0] - 0.08)) ** 2 + (y / (body_axes[1] - 0.08)) ** 2 <= 1.0
    volume = np.full(config.shape, AIR_HU)
    volume[body] = FAT_HU
    volume[inner] = TISSUE_HU
    spine = (x ** 2 + (y - 0.75 * body_axes[1] + 0.12) ** 2) <= 0.1 ** 2
    volume[spine & inner] = BONE_HU

    # Liver: on one side, covering a random part of the z range (some slices have none).
    centre = (rng.uniform(-0.45, -0.15), rng.uniform(-0.25, 0.1), rng.uniform(-0.3, 0.3))
    semi_axes = (rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.4), rng.uniform(0.35, 0.6))
    liver = _ellipsoid(grid, centre, semi_axes) & inner
    texture = ndimage.gaussian_filter(rng.normal(size=config.shape), sigma=2.0)
    texture *= config.texture_hu / max(texture.std(), 1e-6)
    liver_hu = rng.uniform(*config.liver_hu)
    volume[liver] = liver_hu + texture[liver]
    labels = liver.astype(np.uint8)

    for _ in range(rng.integers(0, config.max_lesions + 1)):
        inside = np.argwhere(liver)
        if not len(inside):
            break
        seed_voxel = inside[rng.integers(len(inside))]
        lesion_centre = tuple(g[tuple(seed_voxel)] for g in grid)
        lesion_axes = tuple(rng.uniform(0.05, 0.12, size=3) * (1, 1, 2))
        lesion = _ellipsoid(grid, lesion_centre, lesion_axes) & liver
        volume[lesion] = liver_hu + rng.uniform(*config.lesion_contrast_hu) + 0.5 * texture[lesion]
        labels[lesion] = 2

    volume += rng.normal(scale=config.noise_hu, size=config.shape)
    volume = np.clip(np.round(volume), -1024, 3071).astype(np.int16)
    return volume, labels, random_affine(rng, config)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """``array`` with ``affine`` as a NIfTI-1 file (``.nii`` or ``.nii.gz`` by the name)."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    nib.save(image, str(path))
    return Path(path)


def write_synthetic_lits(root: str | Path, num_cases: int, *, seed: int = 0,
                         config: SyntheticCTConfig = SyntheticCTConfig(), compress: bool = True) -> list[Path]:
    """Writes ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` for N = 0..num_cases-1; returns the volumes."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if compress else ".nii"
    paths = []
    for case in range(num_cases):
        volume, labels, affine = synthetic_case(np.random.default_rng([seed, case]), config)
        paths.append(write_nifti(root / f"volume-{case}{suffix}", volume, affine))
        write_nifti(root / f"segmentation-{case}{suffix}", labels, affine)
    return paths
