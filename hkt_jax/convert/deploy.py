"""A trained child as one inference function from raw inputs to the task's output, for deployment exports.

Each exported artifact (``export-stablehlo``, ``export-onnx``) takes inputs as a user has them
and runs the preprocessing of the training run inside, so no hkt_jax code is needed beside it:

* classification (``cifar_resnet``): ``image`` uint8 RGB ``(B, 32, 32, 3)`` -> logits ``(B, classes)``;
  ``(x / 255 - mean) / std`` with the run's ``data.normalization``.
* optical flow (``raft``): ``image1``, ``image2`` uint8 RGB ``(B, H, W, 3)`` -> the last iteration's flow
  ``(B, H, W, 2)`` in pixels (x, y); RAFT scales frames to [-1, 1] itself. H, W fixed at export.
* segmentation (``pocketnet``, ``unet``, ``dense_unet``): ``slice`` float32 Hounsfield units ``(B, H, W)`` ->
  class logits ``(B, H, W, classes)``; the run's HU window (``seg.window``) clipped and scaled to [0, 1].
  H, W fixed at export (the run's ``seg.slice_size``); resizing a slice to it stays with the caller.

The batch dimension stays free. Models are rebuilt with ``conv_impl="xla"`` (and RAFT's refinement
loop rolled): the CPU convolution kernels are XLA FFI custom calls a plain jax process does not have.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.training.checkpoint import CHECKPOINTS_SUBDIR, MODEL_SPEC_FILE, load_model
from hkt_jax.data.pipeline import NORMALIZATIONS
from hkt_jax.data.volumes import DEFAULT_WINDOW
from hkt_jax.models.registry import build_model

# Where a training run's workdir keeps its exported child.
WORKDIR_CHILD = Path("export") / "child"
# The config a training run writes to its workdir: its data / seg sections say how inputs were prepared.
RUN_CONFIG_FILE = "config.json"
CIFAR_IMAGE_SIZE = (32, 32)
SEGMENTATION_ARCHS = ("pocketnet", "unet", "dense_unet")
DEPLOYABLE_ARCHS = ("cifar_resnet", "raft", *SEGMENTATION_ARCHS)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int | None, ...]  # None: the batch dimension, free
    dtype: str
    description: str


@dataclasses.dataclass(frozen=True)
class Deployable:
    """``apply(*raw_inputs) -> output`` with the weights closed over, and what it takes and returns."""

    arch: str
    apply: Callable[..., jax.Array]
    inputs: tuple[InputSpec, ...]
    output: str
    preprocessing: dict[str, Any]
    spec: dict[str, Any]
    variables: Any

    def describe(self) -> dict[str, Any]:
        """JSON-able record written next to every exported file."""
        return {
            "arch": self.arch,
            "kwargs": self.spec.get("kwargs", {}),
            "inputs": [dataclasses.asdict(spec) for spec in self.inputs],
            "output": self.output,
            "preprocessing": self.preprocessing,
        }


def resolve_model_dir(src: Path) -> Path:
    """A model checkpoint dir as given, or the exported child inside a training workdir."""
    for candidate in (src, src / WORKDIR_CHILD):
        if (candidate / MODEL_SPEC_FILE).is_file():
            return candidate
    if (src / RUN_CONFIG_FILE).is_file() or (src / CHECKPOINTS_SUBDIR).is_dir():  # a run that has not finished
        best = src / "best"
        so_far = (
            f", or export the best network so far: --src {best}"
            if (best / MODEL_SPEC_FILE).is_file()
            else f"; it has no {best.name}/ yet either (no evaluation has run)"
        )
        raise FileNotFoundError(
            f"{src} is a training workdir without {WORKDIR_CHILD} yet: its run has not finished "
            f"(the network is exported at the end). Finish the run (rerun its command to "
            f"resume){so_far}"
        )
    raise FileNotFoundError(
        f"{src} is neither a model checkpoint dir nor a training workdir: "
        f"no {src / MODEL_SPEC_FILE} and no {src / WORKDIR_CHILD / MODEL_SPEC_FILE}"
    )


def run_config(model_dir: Path) -> dict:
    """The training run's config.json for a model dir a run wrote (WORKDIR/export/child, WORKDIR/best), else {}."""
    model_dir = model_dir.absolute()
    workdirs = [model_dir.parents[1]] if model_dir.parts[-2:] == WORKDIR_CHILD.parts else []
    workdirs += [model_dir.parent] if model_dir.name == "best" else []
    for workdir in workdirs:
        if (workdir / RUN_CONFIG_FILE).is_file():
            return json.loads((workdir / RUN_CONFIG_FILE).read_text())
    return {}


def run_normalization(model_dir: Path, normalization: str | None) -> str:
    """The input normalisation a classifier was trained with: given, else its run's ``data.normalization``."""
    normalization = normalization or run_config(model_dir).get("data", {}).get("normalization")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"{model_dir}: cannot tell the input normalisation the model was trained with (no "
            f"{RUN_CONFIG_FILE} of its training run next to it); pass --normalization, one of "
            f"{sorted(NORMALIZATIONS)}"
        )
    return normalization


def normalize_uint8(images: jax.Array, normalization: str) -> jax.Array:
    """uint8 -> float32 ``(x / 255 - mean) / std``, as one multiply-add like the training pipeline's."""
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATIONS[normalization])
    return images.astype(jnp.float32) * (1 / (255 * std)) + (-mean / std)


def window_hu(hu: jax.Array, window: tuple[float, float]) -> jax.Array:
    """Clip to the HU window and scale to [0, 1] (``hkt_jax.data.volumes.window_hu``)."""
    low, high = (float(v) for v in window)
    if not high > low:
        raise ValueError(f"HU window must have high > low, got {window}")
    return (jnp.clip(hu.astype(jnp.float32), low, high) - low) / (high - low)


def _size(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    height, width = (int(value), int(value)) if np.ndim(value) == 0 else (int(value[0]), int(value[1]))
    if height < 1 or width < 1:
        raise ValueError(f"{what} must be positive, got {value}")
    return height, width


def _classifier(model, variables, spec, model_dir, normalization):
    normalization = run_normalization(model_dir, normalization)
    mean, std = NORMALIZATIONS[normalization]

    def apply(image):
        return model.apply(variables, normalize_uint8(image, normalization), train=False).astype(jnp.float32)

    inputs = (InputSpec("image", (None, *CIFAR_IMAGE_SIZE, 3), "uint8", "RGB pixels in [0, 255], NHWC"),)
    preprocessing = {
        "normalization": normalization,
        "mean": list(mean),
        "std": list(std),
        "formula": "(x / 255 - mean) / std, per channel",
    }
    return apply, inputs, f"logits (B, {spec['kwargs'].get('num_classes', 10)}) float32", preprocessing


def _flow(model, variables, spec, model_dir, frame_size, iters):
    config = run_config(model_dir).get("data", {})
    size = _size(frame_size or config.get("crop_size"), "frame size")
    if size is None:
        raise ValueError(
            f"{model_dir}: no training run config.json with data.crop_size next to it; pass "
            "--frame_size H,W (multiples of 8, at least 64)"
        )
    if size[0] % 8 or size[1] % 8 or min(size) < 64:
        raise ValueError(f"RAFT frames must be multiples of 8 and at least 64x64, got {size[0]}x{size[1]}")
    iters = int(iters or spec["kwargs"].get("iters", 12))
    if iters < 1:
        raise ValueError(f"RAFT iterations must be >= 1, got {iters}")

    def apply(image1, image2):
        frames = (image1.astype(jnp.float32), image2.astype(jnp.float32))  # RAFT takes [0, 255]
        return model.apply(variables, *frames, iters=iters, train=False)[-1].astype(jnp.float32)

    inputs = tuple(
        InputSpec(name, (None, *size, 3), "uint8", f"{which} frame, RGB pixels in [0, 255], NHWC")
        for name, which in (("image1", "first"), ("image2", "second"))
    )
    preprocessing = {"iters": iters, "frame_size": list(size), "formula": "2 * x / 255 - 1 (inside RAFT)"}
    return apply, inputs, "flow of the last iteration (B, H, W, 2) float32, pixels (x, y)", preprocessing


def _segmenter(model, variables, spec, model_dir, slice_size):
    config = run_config(model_dir)
    seg = config.get("seg", {})
    size = _size(slice_size or seg.get("slice_size"), "slice size")
    if size is None:
        raise ValueError(
            f"{model_dir}: no training run config.json with seg.slice_size next to it; pass "
            "--slice_size N (the slice size the network was trained on)"
        )
    step = 2 ** len(model.level_widths)
    if size[0] % step or size[1] % step:
        raise ValueError(f"{spec['arch']} needs slices whose sides are multiples of {step}, got {size[0]}x{size[1]}")
    if spec["kwargs"].get("in_channels", 1) != 1:
        raise ValueError(f"{model_dir}: the network takes {spec['kwargs']['in_channels']} channels; CT slices have 1")
    if config.get("data", {}).get("source") == "png_folder":
        raise ValueError(
            f"{model_dir} was trained on PNG pairs (data.source=png_folder), not CT in Hounsfield "
            "units; deployment exports take CT slices"
        )
    window = tuple(float(v) for v in seg.get("window", DEFAULT_WINDOW))

    def apply(hu_slice):
        return model.apply(variables, window_hu(hu_slice, window)[..., None], train=False).astype(jnp.float32)

    inputs = (InputSpec("slice", (None, *size), "float32", "axial CT slice in Hounsfield units, volume[:, :, k]"),)
    preprocessing = {
        "window": list(window),
        "slice_size": list(size),
        "formula": "(clip(x, low, high) - low) / (high - low)",
    }
    classes = spec["kwargs"].get("num_classes", 3)
    return apply, inputs, f"class logits (B, H, W, {classes}) float32", preprocessing


def load_deployable(
    src: str | Path,
    *,
    normalization: str | None = None,
    frame_size: Any = None,
    iters: int | None = None,
    slice_size: Any = None,
) -> Deployable:
    """The child in ``src`` (model checkpoint dir or training workdir) as a raw-input inference function."""
    model_dir = resolve_model_dir(Path(src))
    variables, spec = load_model(model_dir)
    arch = spec.get("arch")
    if arch not in DEPLOYABLE_ARCHS:
        raise ValueError(f"{model_dir} holds a {arch!r} model; deployment exports know {DEPLOYABLE_ARCHS}")
    variables = jax.tree.map(jnp.asarray, {k: variables[k] for k in ("params", "batch_stats") if k in variables})
    if arch == "cifar_resnet":
        model = build_model(spec, conv_impl="xla")
        built = _classifier(model, variables, spec, model_dir, normalization)
    elif arch == "raft":
        model = build_model(spec, unroll=1)  # inference: the rolled loop compiles to a smaller program
        built = _flow(model, variables, spec, model_dir, frame_size, iters)
    else:
        model = build_model(spec)
        built = _segmenter(model, variables, spec, model_dir, slice_size)
    apply, inputs, output, preprocessing = built
    return Deployable(arch, apply, inputs, output, preprocessing, spec, variables)
