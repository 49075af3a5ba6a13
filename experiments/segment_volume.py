"""Segment a whole CT volume with a trained network, slice by slice.

    python -m experiments.segment_volume --model DIR VOLUME.nii.gz --out PRED.nii.gz [--gt SEG.nii.gz]

``DIR`` is a model checkpoint: a run's ``export/child`` or ``best`` (or a parent's).
Every axial slice ``volume[:, :, k]`` is preprocessed as in training (HU window,
resize; read from the run's ``config.json`` next to the model, else the LiTS
defaults, or given with ``--window`` / ``--size``), zero-padded to a multiple of the
network's down-sampling, segmented in batches, and the argmax labels are written as
a uint8 NIfTI with the input's affine and header. ``--gt`` prints the Dice per region
(LiTS: liver = labels 1 and 2, tumour = label 2). PNG overlays (image | ground truth
or blank | prediction) of a few slices go to ``--png_dir`` (default: next to ``--out``).
Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_PNG_SLICES = 4


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.segment_volume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model checkpoint dir (a run's export/child or best)")
    parser.add_argument("volume", help="CT volume (NIfTI, Hounsfield units)")
    parser.add_argument("--out", required=True, help="where to write the predicted label volume (.nii or .nii.gz)")
    parser.add_argument("--gt", default=None, help="ground-truth label volume: print the Dice per region")
    parser.add_argument("--window", default=None, help="HU window LOW,HIGH (default: the run's, else -200,250)")
    parser.add_argument(
        "--size", type=int, default=None, help="square slice size the network takes (default: the run's)"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="slices per forward pass (default: %(default)s)")
    parser.add_argument("--png_dir", default=None, help="overlay PNGs go here (default: <out stem>_slices/)")
    parser.add_argument(
        "--png_slices",
        type=int,
        default=DEFAULT_PNG_SLICES,
        help="how many slices to draw, spread over those with labels (0: none; default: %(default)s)",
    )
    return parser.parse_args(argv)


def run_settings(model_dir: Path):
    """``SegSettings`` of the run that wrote ``model_dir`` (its ``config.json`` is one or two levels up)."""
    from hkt_jax.tasks.segmentation import SegSettings

    for directory in (model_dir, model_dir.parent, model_dir.parent.parent):
        path = directory / "config.json"
        if path.is_file():
            seg = json.loads(path.read_text()).get("seg")
            if seg:
                fields = {"window", "slice_size", "num_classes"}
                return SegSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in seg.items() if k in fields})
    return SegSettings()


def _pad_to(slices: np.ndarray, multiple: int) -> np.ndarray:
    pad_h, pad_w = (-slices.shape[1]) % multiple, (-slices.shape[2]) % multiple
    return np.pad(slices, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else slices


def predict_slices(model, variables, slices: np.ndarray, batch_size: int) -> np.ndarray:
    """(Z, H, W) argmax labels of (Z, H, W, C) inputs; fixed-size batches (one compilation)."""
    import jax
    import jax.numpy as jnp

    apply = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1).astype(jnp.uint8))
    depth = len(model.level_widths) if hasattr(model, "level_widths") else 0
    padded = _pad_to(slices, 2**depth)
    batch_size = max(1, min(batch_size, len(padded)))
    labels = []
    for start in range(0, len(padded), batch_size):
        batch = padded[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)])
        labels.append(np.asarray(apply(variables, batch))[:real])
    return np.concatenate(labels)[:, : slices.shape[1], : slices.shape[2]]


def overlay_slices(
    images: np.ndarray, truth: np.ndarray | None, predicted: np.ndarray, count: int, out_dir: Path
) -> list[Path]:
    """PNGs of ``count`` slices spread over those with any label: image | truth | prediction."""
    from PIL import Image

    from hkt_jax.tasks.segmentation import overlay

    if count <= 0:
        return []
    labelled = (predicted > 0) if truth is None else (truth > 0) | (predicted > 0)
    candidates = np.flatnonzero(labelled.reshape(len(labelled), -1).any(axis=1))
    candidates = candidates if len(candidates) else np.arange(len(predicted))
    chosen = np.unique(candidates[np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k in chosen.tolist():
        blank = np.zeros_like(predicted[k])
        row = np.concatenate(
            [
                overlay(images[k], blank),
                overlay(images[k], blank if truth is None else truth[k]),
                overlay(images[k], predicted[k]),
            ],
            axis=1,
        )
        scale = max(1, 256 // row.shape[0])  # small slices drawn larger, pixel for pixel
        row = np.repeat(np.repeat(row, scale, axis=0), scale, axis=1)
        path = out_dir / f"slice_{k:04d}.png"
        Image.fromarray(row).save(path)
        written.append(path)
    return written


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else path.stem


def segment(args) -> int:
    import nibabel as nib

    from hkt_jax.training import checkpoint
    from hkt_jax.data import volumes
    from hkt_jax.models import build_model
    from hkt_jax.tasks.seg_metrics import DiceAccumulator

    model_dir = Path(args.model)
    out = Path(args.out)
    if not _nifti_stem(out) or not out.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out {out}: must end in .nii or .nii.gz")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    settings = run_settings(model_dir)
    window = settings.window
    if args.window:
        try:
            window = tuple(float(v) for v in args.window.split(","))
        except ValueError:
            raise ValueError(f"--window {args.window!r}: expected LOW,HIGH in HU, e.g. -200,250") from None
        if len(window) != 2:
            raise ValueError(f"--window {args.window!r}: expected LOW,HIGH in HU, e.g. -200,250")
    size = args.size or settings.slice_size
    variables, spec = checkpoint.load_model(model_dir)
    model = build_model(spec)
    hu, affine = volumes.read_nifti(args.volume)
    header = nib.load(args.volume).header.copy()
    truth = None
    if args.gt:
        truth = volumes.check_labels(volumes.read_nifti(args.gt)[0], spec["kwargs"].get("num_classes", 3), args.gt)
        if truth.shape != hu.shape:
            raise ValueError(f"{args.gt}: shape {truth.shape} differs from {args.volume} shape {hu.shape}")

    slices = volumes.volume_to_slices(hu, window, size)
    in_channels = spec["kwargs"].get("in_channels", 1)
    if in_channels != 1:
        raise ValueError(f"{model_dir}: the network takes {in_channels} channels; CT slices have 1")
    predicted = predict_slices(model, variables, slices, args.batch_size)
    labels = volumes.slices_to_volume(predicted, hu.shape).astype(np.uint8)

    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, affine, header), str(out))
    print(
        f"wrote {out}: {labels.shape} labels, {int((labels > 0).sum())} voxels labelled "
        f"(window {window}, slices {'x'.join(map(str, slices.shape[1:3]))})"
    )
    if truth is not None:
        num_classes = spec["kwargs"].get("num_classes", 3)
        from hkt_jax.tasks.segmentation import SegSettings

        regions = SegSettings(num_classes=num_classes).regions
        accumulator = DiceAccumulator(regions)
        accumulator.add_volume(labels, truth, Path(args.volume).name)
        dice = accumulator.result()
        print("Dice " + ", ".join(f"{name}: {dice[f'dice_global/{name}']:.4f}" for name, _ in regions))
    png_dir = Path(args.png_dir) if args.png_dir else out.parent / f"{_nifti_stem(out)}_slices"
    volume_slices = volumes.volume_to_slices(hu, window)  # native size: overlays on the voxels written
    written = overlay_slices(
        volume_slices,
        None if truth is None else np.moveaxis(truth, -1, 0),
        np.moveaxis(labels, -1, 0),
        args.png_slices,
        png_dir,
    )
    if written:
        print(f"overlays: {len(written)} PNGs in {png_dir}")
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return segment(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
