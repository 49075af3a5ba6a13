"""Image-folder source: `<root>/<split>/<class>/*.png|jpg|jpeg`, or a `.tar.gz` of it.

Archives are extracted once into a cache directory and the decoded split is
cached as `.npz` beside the extraction, because decoding 50k JPEGs costs
seconds on every start while loading the `.npz` costs a fraction of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from hkt_jax.runtime.paths import data_cache_dir, shared_data_dir
from hkt_jax.data.sources import CIFAR10_CLASSES, IMAGE_SHAPE, SHARED_ARCHIVE_HINT, ImageSet, checked_image_set

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_EXTRACTION_MARKER = ".hkt_extracted.json"
_LAYOUT = "expected <data.path>/<split>/<class_name>/*.png|jpg|jpeg (or a .tar.gz of that tree)"


def default_cache_dir() -> Path:
    """Where archives are extracted and decoded (``hkt_jax.runtime.paths.data_cache_dir``), kept between runs."""
    return data_cache_dir() / "extracted"


def shared_cifar10_archive() -> Path:
    """The shared lossy CIFAR-10 JPEG archive in ``hkt_jax.runtime.paths.shared_data_dir()``."""
    return shared_data_dir() / "cifar10-q75" / "cifar10-q75-imagefolder.tar.gz"


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _archive_fingerprint(archive: Path) -> dict[str, object]:
    """Size and mtime identify the archive well enough to notice it was replaced."""
    stat = archive.stat()
    return {"archive": str(archive.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(directory: Path) -> dict[str, object] | None:
    try:
        return json.loads((directory / _EXTRACTION_MARKER).read_text())
    except (OSError, ValueError):
        return None


def extract_archive(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extracts `archive` into `<cache_dir>/<stem>` once and returns that directory.

    Extraction goes into a temporary sibling that is renamed into place only
    when complete (with a marker naming the archive), so a killed run or a
    concurrent one never leaves a half-extracted tree that looks finished.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"data.path={str(archive)!r}: archive not found ({_LAYOUT}). {SHARED_ARCHIVE_HINT}"
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / _archive_stem(archive)
    fingerprint = _archive_fingerprint(archive)
    if _read_marker(target) == fingerprint:
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_dir))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(f"data.path={str(archive)!r}: cannot extract archive ({error}).") from error
        (staging / _EXTRACTION_MARKER).write_text(json.dumps(fingerprint))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if _read_marker(target) == fingerprint:  # a concurrent run finished first
            return target
        if target.exists():  # stale or unfinished extraction of an older archive
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=cache_dir))
            os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if _read_marker(target) != fingerprint:  # not a concurrent twin: real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _visible_subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_split_dir(root: Path, split: str) -> Path:
    """`<root>/<split>`, also when an archive wraps the tree in one top folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(root)!r}: directory not found ({_LAYOUT}). {SHARED_ARCHIVE_HINT}")
    candidates = [root / split]
    subdirs = _visible_subdirs(root)
    if len(subdirs) == 1:
        candidates.append(subdirs[0] / split)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"data.path={str(root)!r}: no {split!r} split directory ({_LAYOUT}); found "
        f"{[p.name for p in subdirs] or 'nothing'}."
    )


def resolve_class_names(found: list[str], requested: tuple[str, ...] | None, where: Path) -> tuple[str, ...]:
    """Label order: the requested list, CIFAR-10's official order if the names match, else sorted."""
    if requested is not None:
        unknown = sorted(set(found) - set(requested))
        if unknown:
            raise ValueError(f"{where}: class folders {unknown} are not in data.class_names {list(requested)}.")
        missing = [name for name in requested if name not in found]
        if missing:
            raise ValueError(f"{where}: no class folders for {missing}, which data.class_names or the train split "
                             f"have; every split needs a folder per class ({_LAYOUT}).")
        return tuple(requested)
    if set(found) == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(found))


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except Exception as error:  # Pillow raises many types for broken files
        raise ValueError(f"{path}: unreadable image ({type(error).__name__}: {error}).") from error
    if pixels.shape != IMAGE_SHAPE:
        raise ValueError(f"{path}: expected a 32x32 image, got {pixels.shape[1]}x{pixels.shape[0]}.")
    return pixels


def decode_split_dir(split_dir: Path, class_names: tuple[str, ...] | None = None, *,
                     skip_unreadable: bool = False) -> ImageSet:
    """Decodes every image of one split, in class order then file-name order.

    An unreadable image is an error naming it, or with ``skip_unreadable`` is left
    out, warned about and listed in ``ImageSet.skipped_files``."""
    class_dirs = _visible_subdirs(split_dir)
    if not class_dirs:
        raise ValueError(f"{split_dir}: no class folders ({_LAYOUT}).")
    class_names = resolve_class_names([d.name for d in class_dirs], class_names, split_dir)
    files, labels = [], []
    empty = []
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        empty += [] if images else [class_dir.name]
        files += images
        labels += [class_names.index(class_dir.name)] * len(images)
    if not files:
        raise ValueError(f"{split_dir}: class folders hold no .png/.jpg/.jpeg images ({_LAYOUT}).")
    if empty:
        raise ValueError(f"{split_dir}: class folders {empty} hold no .png/.jpg/.jpeg images ({_LAYOUT}).")
    decoded, kept_labels, skipped = [], [], []
    for file, label in zip(files, labels):
        try:
            decoded.append(_decode(file))
        except ValueError as error:
            if not skip_unreadable or "unreadable image" not in str(error):
                raise
            skipped.append(str(file))
            continue
        kept_labels.append(label)
    if skipped:
        warnings.warn(f"{split_dir}: skipped {len(skipped)} unreadable image(s) of {len(files)}, e.g. {skipped[0]}",
                      stacklevel=2)
    if not decoded:
        raise ValueError(f"{split_dir}: every image is unreadable (e.g. {skipped[0]}).")
    images = checked_image_set(np.stack(decoded), np.asarray(kept_labels), str(split_dir), class_names)
    return dataclasses.replace(images, skipped_files=tuple(skipped))


def _load_decoded_cache(cache_file: Path, key: dict[str, object]) -> ImageSet | None:
    try:
        with np.load(cache_file) as cached:
            if json.loads(str(cached["key"])) != key:
                return None
            return ImageSet(cached["images"], cached["labels"], tuple(str(n) for n in cached["class_names"]))
    except (OSError, ValueError, KeyError):
        return None


def _save_decoded_cache(cache_file: Path, key: dict[str, object], images: ImageSet) -> None:
    """Written to a temp file and renamed, so readers never see a partial cache."""
    with tempfile.NamedTemporaryFile(
        dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".npz", delete=False
    ) as file:
        np.savez(
            file,
            key=np.asarray(json.dumps(key)),
            images=images.images,
            labels=images.labels,
            class_names=np.asarray(images.class_names),
        )
    os.chmod(file.name, 0o644)
    os.replace(file.name, cache_file)


def load_image_folder(
    path: str | Path,
    split: str,
    *,
    class_names: tuple[str, ...] | None = None,
    cache_dir: str | Path | None = None,
    skip_unreadable: bool = False,
) -> ImageSet:
    """Loads one split of an image folder or of a `.tar.gz` image-folder archive
    (``skip_unreadable``: leave broken images out, counted, instead of stopping)."""
    if not is_archive(path):
        return decode_split_dir(find_split_dir(Path(path), split), class_names, skip_unreadable=skip_unreadable)
    root = extract_archive(path, cache_dir)
    split_dir = find_split_dir(root, split)
    class_names = resolve_class_names([d.name for d in _visible_subdirs(split_dir)], class_names, split_dir)
    cache_file = root.parent / f"{root.name}.{split}.npz"
    key = {**_read_marker(root), "split": split, "class_names": list(class_names)}
    cached = _load_decoded_cache(cache_file, key)
    if cached is not None:
        return cached
    images = decode_split_dir(split_dir, class_names, skip_unreadable=skip_unreadable)
    _save_decoded_cache(cache_file, key, images)
    return images
