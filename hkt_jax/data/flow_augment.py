"""RAFT's optical-flow augmentation (princeton-vl/RAFT core/utils/augmentor.py) in NumPy.

Photometric jitter (shared by both frames, or per frame with probability
``asymmetric_prob``), an eraser that pastes mean-colour boxes into frame 2
(occlusion), random scale + stretch, flips and a random crop. The *sparse*
variant (KITTI, HD1K) moves each valid flow point to its rounded position in
the resized frame instead of interpolating the field, never stretches, and
crops with RAFT's margins.

Every random number comes from the ``np.random.Generator`` passed in, in a
fixed order, so a seeded generator gives the same sample on every run.
Samples are dicts of float32 ``image1``, ``image2`` (H, W, 3) in [0, 255],
``flow`` (H, W, 2) and ``valid`` (H, W) in {0, 1}.

Differences from RAFT: images stay float (no uint8 rounding between steps),
resizing is cv2's INTER_LINEAR written in NumPy, a frame already at the crop
size may be cropped at offset 0, frames too small for the crop are always
resized, and sparse points land at ``round((x + 0.5) * s - 0.5)`` (the pixel
grid of the resized images) rather than RAFT's ``round(x * s)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Dense flows beyond this are "unknown" (RAFT's FlowDataset rule).
MAX_KNOWN_FLOW = 1000.0


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """RAFT's augmentation knobs; the defaults are its FlowAugmentor's."""

    crop_size: tuple[int, int] = (368, 496)
    min_scale: float = -0.2  # log2 of the random zoom range
    max_scale: float = 0.5
    spatial_prob: float = 0.8
    stretch_prob: float = 0.8
    max_stretch: float = 0.2
    do_flip: bool = True
    h_flip_prob: float = 0.5
    v_flip_prob: float = 0.1
    photometric: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.5 / 3.14
    asymmetric_prob: float = 0.2
    eraser_prob: float = 0.5
    eraser_size: tuple[int, int] = (50, 100)  # box side in [low, high) pixels
    sparse: bool = False


def raft_augment_config(dataset: str, crop_size: tuple[int, int]) -> AugmentConfig:
    """The settings RAFT's ``fetch_dataloader`` uses for each training set."""
    crop_size = tuple(crop_size)
    dense = dict(crop_size=crop_size)
    sparse = dict(crop_size=crop_size, sparse=True, brightness=0.3, contrast=0.3, saturation=0.3,
                  hue=0.3 / 3.14, asymmetric_prob=0.0, stretch_prob=0.0, v_flip_prob=0.0)
    presets = {
        "chairs": AugmentConfig(**dense, min_scale=-0.1, max_scale=1.0),
        "things": AugmentConfig(**dense, min_scale=-0.4, max_scale=0.8),
        "sintel": AugmentConfig(**dense, min_scale=-0.2, max_scale=0.6),
        "kitti": AugmentConfig(**sparse, min_scale=-0.2, max_scale=0.4, do_flip=False),
        "hd1k": AugmentConfig(**sparse, min_scale=-0.5, max_scale=0.2, do_flip=True),
    }
    if dataset not in presets:
        raise ValueError(f"no RAFT augmentation preset for {dataset!r}; expected one of {sorted(presets)}")
    return presets[dataset]


# ----------------------------------------------------------------------------- photometric


def _grayscale(images: np.ndarray) -> np.ndarray:
    # Not `images @ weights`: BLAS rounds differently on different CPUs; a seed gives the same batches everywhere.
    red, green, blue = images[..., 0], images[..., 1], images[..., 2]
    return red * np.float32(0.299) + green * np.float32(0.587) + blue * np.float32(0.114)


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maximum, minimum = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = maximum - minimum
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(maximum == r, (g - b) / safe, np.where(maximum == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    saturation = np.where(maximum > 0, delta / np.where(maximum > 0, maximum, 1.0), 0.0)
    return hue, saturation, maximum


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Closed form: channel n in (5, 3, 1) is ``v - v s clip(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``."""
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * hue) % 6.0
        channels.append(value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, axis=-1)


def adjust_colors(images: np.ndarray, order, brightness: float, contrast: float, saturation: float, hue: float):
    """Brightness, contrast, saturation (factors) and hue (shift in turns) in the given order, clipping each."""
    out = images.astype(np.float32)
    for transform in order:
        if transform == 0:
            out = out * brightness
        elif transform == 1:
            out = contrast * out + (1 - contrast) * _grayscale(out).mean()
        elif transform == 2:
            out = saturation * out + (1 - saturation) * _grayscale(out)[..., None]
        else:
            hue_, saturation_, value = _rgb_to_hsv(out / np.float32(255))
            out = np.float32(255) * _hsv_to_rgb((hue_ + np.float32(hue)) % np.float32(1), saturation_, value)
        out = np.clip(out, 0.0, 255.0)
    return out.astype(np.float32)


def color_jitter(images: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """torchvision ColorJitter on a stack of frames sharing one draw (factors and order).

    Contrast blends towards the mean gray of the whole stack, as RAFT's
    jitter of the two frames concatenated into one picture does.
    """
    factors = [rng.uniform(max(0.0, 1 - v), 1 + v) for v in (config.brightness, config.contrast, config.saturation)]
    hue_shift = rng.uniform(-config.hue, config.hue)
    return adjust_colors(images, rng.permutation(4), *factors, hue_shift)


def photometric(image1: np.ndarray, image2: np.ndarray, rng: np.random.Generator, config: AugmentConfig):
    """Same jitter for both frames, or (with ``asymmetric_prob``) one draw per frame."""
    if rng.random() < config.asymmetric_prob:
        return color_jitter(image1, rng, config), color_jitter(image2, rng, config)
    jittered = color_jitter(np.stack([image1, image2]), rng, config)
    return jittered[0], jittered[1]


def eraser(image2: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """With ``eraser_prob``, one or two boxes of frame 2 take its mean colour."""
    if rng.random() >= config.eraser_prob:
        return image2
    image2 = image2.copy()
    height, width = image2.shape[:2]
    mean_color = image2.reshape(-1, 3).mean(axis=0)
    for _ in range(rng.integers(1, 3)):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        dx, dy = rng.integers(*config.eraser_size), rng.integers(*config.eraser_size)
        image2[y0 : y0 + dy, x0 : x0 + dx] = mean_color
    return image2


# ----------------------------------------------------------------------------- geometry


def resize_bilinear(
    array: np.ndarray, scale_x: float, scale_y: float, window: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """cv2.resize(fx, fy, INTER_LINEAR): size ``round(n * s)``, pixel centres mapped, edges clamped.

    ``window`` = (top, left, height, width) computes only that part of the resized array.
    """
    height, width = array.shape[:2]
    out_height, out_width = int(round(height * scale_y)), int(round(width * scale_x))
    top, left, rows_out, cols_out = window or (0, 0, out_height, out_width)
    if top < 0 or left < 0 or top + rows_out > out_height or left + cols_out > out_width:
        raise ValueError(f"window {window} is outside the {out_height}x{out_width} resized frame")

    def taps(start: int, count: int, size_in: int, scale: float):
        source = np.clip((np.arange(start, start + count) + 0.5) / scale - 0.5, 0, size_in - 1)
        low = np.floor(source).astype(np.int64)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    y0, y1, fy = taps(top, rows_out, height, scale_y)
    x0, x1, fx = taps(left, cols_out, width, scale_x)
    values = array.reshape(height, width, -1).astype(np.float32)
    rows = values[y0] * (1 - fy)[:, None, None] + values[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return out.reshape(out.shape[:2] + array.shape[2:])


def resize_sparse_flow(flow: np.ndarray, valid: np.ndarray, scale_x: float, scale_y: float):
    """Moves each valid point to its nearest pixel in the resized frame; its flow scales with it."""
    height, width = flow.shape[:2]
    out_height, out_width = int(round(height * scale_y)), int(round(width * scale_x))
    ys, xs = np.nonzero(valid >= 0.5)
    new_x = np.rint((xs + 0.5) * scale_x - 0.5).astype(np.int64)
    new_y = np.rint((ys + 0.5) * scale_y - 0.5).astype(np.int64)
    inside = (new_x >= 0) & (new_x < out_width) & (new_y >= 0) & (new_y < out_height)
    out_flow = np.zeros((out_height, out_width, 2), np.float32)
    out_valid = np.zeros((out_height, out_width), np.float32)
    out_flow[new_y[inside], new_x[inside]] = flow[ys[inside], xs[inside]] * np.float32([scale_x, scale_y])
    out_valid[new_y[inside], new_x[inside]] = 1.0
    return out_flow, out_valid


@dataclasses.dataclass(frozen=True)
class SpatialParams:
    """One draw of the geometric augmentation: zoom (if ``resize``), flips, crop offset."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    resize: bool = False
    h_flip: bool = False
    v_flip: bool = False
    crop_y: int = 0
    crop_x: int = 0


def _crop_origin(rng: np.random.Generator, size: int, crop: int, margins: tuple[int, int] | None) -> int:
    if margins:  # sparse: RAFT lets the offset overshoot by margins, then clamps it (crops touch the border more)
        return int(np.clip(rng.integers(-margins[0], size - crop + margins[1]), 0, size - crop))
    return int(rng.integers(0, size - crop + 1))


def sample_spatial_params(
    rng: np.random.Generator, image_shape: tuple[int, int], config: AugmentConfig
) -> SpatialParams:
    """Draws zoom, stretch, flips and crop for a frame of ``image_shape`` (H, W)."""
    height, width = image_shape[:2]
    crop_height, crop_width = config.crop_size
    pad = 1 if config.sparse else 8
    min_scale = max((crop_height + pad) / height, (crop_width + pad) / width)
    scale = 2 ** rng.uniform(config.min_scale, config.max_scale)
    scale_x = scale_y = scale
    if rng.random() < config.stretch_prob:
        scale_x *= 2 ** rng.uniform(-config.max_stretch, config.max_stretch)
        scale_y *= 2 ** rng.uniform(-config.max_stretch, config.max_stretch)
    scale_x, scale_y = max(scale_x, min_scale), max(scale_y, min_scale)
    too_small = height < crop_height or width < crop_width
    resize = bool(rng.random() < config.spatial_prob) or too_small
    h_flip = v_flip = False
    if config.do_flip:
        h_flip = bool(rng.random() < config.h_flip_prob)
        v_flip = bool(rng.random() < config.v_flip_prob)
    if resize:
        height, width = int(round(height * scale_y)), int(round(width * scale_x))
    crop_y = _crop_origin(rng, height, crop_height, (0, 20) if config.sparse else None)
    crop_x = _crop_origin(rng, width, crop_width, (50, 50) if config.sparse else None)
    return SpatialParams(float(scale_x), float(scale_y), resize, h_flip, v_flip, crop_y, crop_x)


def apply_spatial(sample: dict[str, np.ndarray], params: SpatialParams, config: AugmentConfig):
    """Zooms, flips and crops both frames, the flow and its valid mask consistently.

    Same result as RAFT's resize -> flip -> crop, but only the kept window is resampled.
    """
    image1, image2, flow, valid = (sample[k] for k in ("image1", "image2", "flow", "valid"))
    height, width = image1.shape[:2]
    if params.resize:
        height, width = int(round(height * params.scale_y)), int(round(width * params.scale_x))
    crop_height, crop_width = config.crop_size
    # Where the crop of the flipped frame lies in the unflipped one.
    top = height - params.crop_y - crop_height if params.v_flip else params.crop_y
    left = width - params.crop_x - crop_width if params.h_flip else params.crop_x
    if top < 0 or left < 0 or top + crop_height > height or left + crop_width > width:
        raise ValueError(f"crop {config.crop_size} does not fit the {height}x{width} frame ({params})")
    window = (top, left, crop_height, crop_width)
    inside = (slice(top, top + crop_height), slice(left, left + crop_width))
    scale = np.float32([params.scale_x, params.scale_y])

    def resample(array: np.ndarray) -> np.ndarray:
        if params.resize:
            return resize_bilinear(array, params.scale_x, params.scale_y, window)
        return array[inside]

    image1, image2 = resample(image1), resample(image2)
    if params.resize and config.sparse:
        flow, valid = resize_sparse_flow(flow, valid, params.scale_x, params.scale_y)
        flow, valid = flow[inside], valid[inside]
    elif params.resize:
        flow = resample(flow) * scale
        valid = (resample(valid) > 0.999).astype(np.float32)  # known only if every blended pixel is
    else:
        flow, valid = resample(flow), resample(valid)
    sign = np.float32([-1.0 if params.h_flip else 1.0, -1.0 if params.v_flip else 1.0])
    flips = (slice(None, None, -1 if params.v_flip else 1), slice(None, None, -1 if params.h_flip else 1))
    return {
        "image1": np.ascontiguousarray(image1[flips], np.float32),
        "image2": np.ascontiguousarray(image2[flips], np.float32),
        "flow": np.ascontiguousarray(flow[flips] * sign, np.float32),
        "valid": np.ascontiguousarray(valid[flips], np.float32),
    }


def augment(sample: dict[str, np.ndarray], rng: np.random.Generator, config: AugmentConfig) -> dict[str, np.ndarray]:
    """RAFT's full augmentation: photometric, eraser, then zoom / flip / crop."""
    image1, image2 = sample["image1"], sample["image2"]
    if config.photometric:
        image1, image2 = photometric(image1, image2, rng, config)
    image2 = eraser(image2, rng, config)
    params = sample_spatial_params(rng, image1.shape, config)
    out = apply_spatial({**sample, "image1": image1, "image2": image2}, params, config)
    if not config.sparse:  # RAFT marks huge dense flows unknown
        out["valid"] *= np.all(np.abs(out["flow"]) < MAX_KNOWN_FLOW, axis=-1)
    return out
