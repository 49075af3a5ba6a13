"""Optical-flow datasets in the directory layouts princeton-vl/RAFT reads.

Each constructor scans a folder once and returns a ``FlowPairs``: a random
access source (``len``, ``[index]``) for grain whose items are dicts of float32
``image1``, ``image2`` (H, W, 3) in [0, 255], ``flow`` (H, W, 2) and ``valid``
(H, W) in {0, 1}. Dense sets mark flows over 1000 px unknown (RAFT's rule);
KITTI / HD1K read their mask from the PNG; test splits have no flow (zeros,
``valid`` 0). A missing or malformed folder is a ``ValueError`` naming the
path and the layout that was expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hkt_jax.data.flow_io import read_flow, read_image

MAX_KNOWN_FLOW = 1000.0
_FRAME_SUFFIXES = (".png", ".ppm", ".jpg", ".jpeg")

LAYOUTS = {
    "chairs": "FlyingChairs_release/data/NNNNN_img1.ppm, NNNNN_img2.ppm, NNNNN_flow.flo "
    "and chairs_split.txt (one 1=training / 2=validation per pair) next to data/ or inside it",
    "things": "FlyingThings3D/frames_{clean,final}pass/{TRAIN,TEST}/<A,B,C>/<NNNN>/left/NNNN.png and "
    "FlyingThings3D/optical_flow/{TRAIN,TEST}/<A,B,C>/<NNNN>/{into_future,into_past}/left/*.pfm",
    "sintel": "Sintel/{training,test}/{clean,final}/<scene>/frame_NNNN.png and "
    "Sintel/training/flow/<scene>/frame_NNNN.flo",
    "kitti": "KITTI/{training,testing}/image_2/NNNNNN_{10,11}.png and KITTI/training/flow_occ/NNNNNN_10.png",
    "hd1k": "HD1K/hd1k_input/image_2/SSSSSS_NNNN.png and HD1K/hd1k_flow_gt/flow_occ/SSSSSS_NNNN.png",
    "folder": "a folder of NNN-img0.<ext>, NNN-img1.<ext>, NNN-gt.flo (FlowNet2 examples), or "
    "NNN_img1.<ext>, NNN_img2.<ext>, NNN_flow.flo (FlyingChairs), or a sequence frame_NNNN.<ext> with "
    "frame_NNNN.flo for the flow to the next frame (Sintel)",
}


def layout_error(dataset: str, path: Path, problem: str) -> ValueError:
    return ValueError(f"{dataset} dataset at {path}: {problem}. Expected layout: {LAYOUTS[dataset]}")


def _require_dir(dataset: str, path: Path) -> Path:
    if not path.is_dir():
        raise layout_error(dataset, path, "folder not found")
    return path


def _frames(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class FlowPairs:
    """Frame pairs with their flow files (``None`` where there is no ground truth)."""

    name: str
    image_pairs: tuple[tuple[Path, Path], ...]
    flow_files: tuple[Path | None, ...]
    sparse: bool = False

    def __post_init__(self):
        if len(self.image_pairs) != len(self.flow_files):
            raise ValueError(f"{self.name}: {len(self.image_pairs)} pairs but {len(self.flow_files)} flow entries")

    def __len__(self) -> int:
        return len(self.image_pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        first, second = self.image_pairs[index]
        image1, image2 = read_image(first), read_image(second)
        flow_file = self.flow_files[index]
        if flow_file is None:
            flow = np.zeros(image1.shape[:2] + (2,), np.float32)
            valid = np.zeros(image1.shape[:2], np.float32)
        else:
            flow, valid = read_flow(flow_file)
            if valid is None:
                valid = np.all(np.abs(flow) < MAX_KNOWN_FLOW, axis=-1).astype(np.float32)
        if image1.shape != image2.shape or image1.shape[:2] != flow.shape[:2]:
            raise ValueError(f"{self.name}[{index}]: sizes differ: {first} {image1.shape}, {second} "
                             f"{image2.shape}, {flow_file} {flow.shape}")
        return {"image1": image1, "image2": image2, "flow": flow, "valid": valid}


def flying_chairs(root: str | Path, split: str = "training", split_file: str | Path | None = None) -> FlowPairs:
    """FlyingChairs: ``root`` is ``FlyingChairs_release`` or its ``data`` folder; split training|validation."""
    root = Path(root)
    data = root / "data" if (root / "data").is_dir() else root
    _require_dir("chairs", data)
    images = sorted(data.glob("*.ppm"))
    flows = sorted(data.glob("*.flo"))
    if not flows or len(images) != 2 * len(flows):
        raise layout_error("chairs", data, f"found {len(images)} .ppm frames for {len(flows)} .flo flows")
    candidates = [Path(split_file)] if split_file else [data / "chairs_split.txt", data.parent / "chairs_split.txt"]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise layout_error("chairs", data, f"no split file (looked for {', '.join(map(str, candidates))})")
    labels = np.loadtxt(found[0], dtype=np.int64).reshape(-1)
    if len(labels) != len(flows) or not np.isin(labels, (1, 2)).all():
        raise layout_error("chairs", found[0], f"{len(labels)} split labels for {len(flows)} flows, expected 1s and 2s")
    wanted = {"training": 1, "validation": 2}.get(split)
    if wanted is None:
        raise ValueError(f"FlyingChairs split {split!r}: expected 'training' or 'validation'")
    chosen = np.flatnonzero(labels == wanted)
    pairs = tuple((images[2 * i], images[2 * i + 1]) for i in chosen)
    return FlowPairs(f"chairs-{split}", pairs, tuple(flows[i] for i in chosen))


def flying_things(root: str | Path, pass_name: str = "clean", split: str = "TRAIN") -> FlowPairs:
    """FlyingThings3D left camera, both directions (into_future: t -> t+1, into_past: t+1 -> t)."""
    root = Path(root)
    if pass_name not in ("clean", "final"):
        raise ValueError(f"FlyingThings3D pass {pass_name!r}: expected 'clean' or 'final'")
    frame_root = _require_dir("things", root / f"frames_{pass_name}pass" / split)
    flow_root = _require_dir("things", root / "optical_flow" / split)
    pairs, flow_files = [], []
    scenes = sorted(p.parent.relative_to(frame_root) for p in frame_root.glob("*/*/left"))
    if not scenes:
        raise layout_error("things", frame_root, "no <letter>/<scene>/left folders")
    for scene in scenes:
        frames = _frames(frame_root / scene / "left")
        for direction in ("into_future", "into_past"):
            folder = flow_root / scene / direction / "left"
            flows = sorted(folder.glob("*.pfm")) if folder.is_dir() else []
            if len(flows) != len(frames):
                raise layout_error("things", folder, f"{len(flows)} .pfm flows for {len(frames)} frames")
            for i in range(len(flows) - 1):
                if direction == "into_future":
                    pairs.append((frames[i], frames[i + 1]))
                    flow_files.append(flows[i])
                else:
                    pairs.append((frames[i + 1], frames[i]))
                    flow_files.append(flows[i + 1])
    return FlowPairs(f"things-{pass_name}-{split}", tuple(pairs), tuple(flow_files))


def sintel(root: str | Path, split: str = "training", pass_name: str = "clean") -> FlowPairs:
    """MPI-Sintel consecutive pairs per scene; the test split has no flow."""
    root = Path(root)
    if split not in ("training", "test") or pass_name not in ("clean", "final"):
        raise ValueError(f"Sintel split={split!r} pass={pass_name!r}: expected training|test and clean|final")
    image_root = _require_dir("sintel", root / split / pass_name)
    flow_root = _require_dir("sintel", root / split / "flow") if split == "training" else None
    pairs, flow_files = [], []
    scenes = sorted(p for p in image_root.iterdir() if p.is_dir())
    if not scenes:
        raise layout_error("sintel", image_root, "no scene folders")
    for scene in scenes:
        frames = sorted(scene.glob("*.png"))
        pairs += [(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
        if flow_root is None:
            flow_files += [None] * (len(frames) - 1)
            continue
        flows = sorted((flow_root / scene.name).glob("*.flo"))
        if len(flows) != len(frames) - 1:
            raise layout_error("sintel", flow_root / scene.name, f"{len(flows)} .flo flows for {len(frames)} frames")
        flow_files += flows
    return FlowPairs(f"sintel-{pass_name}-{split}", tuple(pairs), tuple(flow_files))


def kitti(root: str | Path, split: str = "training") -> FlowPairs:
    """KITTI-2015 frames 10 -> 11 with the sparse ``flow_occ`` ground truth (none for testing)."""
    root = Path(root)
    if split not in ("training", "testing"):
        raise ValueError(f"KITTI split {split!r}: expected 'training' or 'testing'")
    image_root = _require_dir("kitti", root / split / "image_2")
    first, second = sorted(image_root.glob("*_10.png")), sorted(image_root.glob("*_11.png"))
    if not first or [p.name[:-7] for p in first] != [p.name[:-7] for p in second]:
        raise layout_error("kitti", image_root, f"{len(first)} *_10.png frames and {len(second)} *_11.png frames")
    if split == "testing":
        flow_files = [None] * len(first)
    else:
        flow_root = _require_dir("kitti", root / split / "flow_occ")
        flow_files = [flow_root / p.name for p in first]
        missing = [p for p in flow_files if not p.is_file()]
        if missing:
            raise layout_error("kitti", flow_root, f"{len(missing)} flows missing, e.g. {missing[0].name}")
    return FlowPairs(f"kitti-{split}", tuple(zip(first, second)), tuple(flow_files), sparse=True)


def hd1k(root: str | Path) -> FlowPairs:
    """HD1K sequences SSSSSS: consecutive frames with the sparse flow of the first."""
    root = Path(root)
    image_root = _require_dir("hd1k", root / "hd1k_input" / "image_2")
    flow_root = _require_dir("hd1k", root / "hd1k_flow_gt" / "flow_occ")
    pairs, flow_files = [], []
    sequences = sorted({p.name.split("_")[0] for p in flow_root.glob("*_*.png")})
    if not sequences:
        raise layout_error("hd1k", flow_root, "no SSSSSS_NNNN.png flows")
    for sequence in sequences:
        flows = sorted(flow_root.glob(f"{sequence}_*.png"))
        frames = sorted(image_root.glob(f"{sequence}_*.png"))
        if len(frames) < len(flows):
            raise layout_error("hd1k", image_root, f"sequence {sequence}: {len(frames)} frames for {len(flows)} flows")
        pairs += [(frames[i], frames[i + 1]) for i in range(len(flows) - 1)]
        flow_files += flows[:-1]
    return FlowPairs("hd1k", tuple(pairs), tuple(flow_files), sparse=True)


def flow_folder(path: str | Path) -> FlowPairs:
    """A plain folder of pairs: FlowNet2-example, FlyingChairs or Sintel-sequence naming (see LAYOUTS)."""
    path = _require_dir("folder", Path(path))
    files = {p.name: p for p in path.iterdir() if p.is_file()}
    frames = [files[n] for n in sorted(files) if files[n].suffix.lower() in _FRAME_SUFFIXES]
    pairs, flow_files = [], []
    for first_tag, second_tag, flow_tag in (("-img0", "-img1", "-gt"), ("_img1", "_img2", "_flow")):
        for frame in frames:
            if not frame.stem.endswith(first_tag):
                continue
            stem = frame.stem[: -len(first_tag)]
            second = files.get(stem + second_tag + frame.suffix)
            flow = next((files[n] for n in (stem + flow_tag + s for s in (".flo", ".pfm", ".png")) if n in files), None)
            if second is not None and flow is not None:
                pairs.append((frame, second))
                flow_files.append(flow)
    if not pairs:  # a sequence: frame k's flow file pairs it with frame k + 1
        for current, following in zip(frames, frames[1:]):
            flow = files.get(current.stem + ".flo")
            if flow is not None:
                pairs.append((current, following))
                flow_files.append(flow)
    if not pairs:
        raise layout_error("folder", path, "no frame pair with a flow file")
    return FlowPairs(f"folder-{path.name}", tuple(pairs), tuple(flow_files))


# name -> constructor(root, **options), for configs and the evaluation CLI.
FLOW_DATASETS: dict[str, Callable[..., FlowPairs]] = {
    "chairs": flying_chairs,
    "things": flying_things,
    "sintel": sintel,
    "kitti": kitti,
    "hd1k": hd1k,
    "folder": flow_folder,
}


def open_flow_dataset(name: str, root: str | Path, **options) -> FlowPairs:
    """``FLOW_DATASETS[name](root, **options)`` with a clear error for unknown names."""
    if name not in FLOW_DATASETS:
        raise ValueError(f"unknown flow dataset {name!r}; expected one of {sorted(FLOW_DATASETS)}")
    return FLOW_DATASETS[name](root, **options)
