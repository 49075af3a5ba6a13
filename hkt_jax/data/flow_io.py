"""Optical-flow file formats: Middlebury ``.flo``, frames (PNG/PPM/JPEG), colour-wheel pictures.

Flows are ``(H, W, 2)`` float32 arrays, channels-last, pixels (x, y), the layout
RAFT and the flow datasets (FlyingChairs, Sintel) use. Readers fail with a
``ValueError`` naming the file when its contents do not fit the format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# Middlebury .flo: float32 magic (bytes "PIEH"), int32 width, int32 height, then H*W*2 float32 (u, v interleaved).
FLO_MAGIC = 202021.25
FLO_HEADER_BYTES = 12


def read_flo(path: str | os.PathLike) -> np.ndarray:
    """A Middlebury ``.flo`` file as ``(H, W, 2)`` float32."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < FLO_HEADER_BYTES:
        raise ValueError(f"{path}: not a .flo file ({len(data)} bytes, shorter than the 12-byte header)")
    magic = np.frombuffer(data, "<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise ValueError(f"{path}: not a .flo file (magic {magic!r}, expected {FLO_MAGIC})")
    width, height = (int(v) for v in np.frombuffer(data, "<i4", count=2, offset=4))
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: invalid .flo size {width}x{height}")
    expected = FLO_HEADER_BYTES + 4 * 2 * width * height
    if len(data) != expected:
        raise ValueError(
            f"{path}: .flo header says {width}x{height} ({expected} bytes) but the file has {len(data)} bytes"
        )
    flow = np.frombuffer(data, "<f4", offset=FLO_HEADER_BYTES).reshape(height, width, 2)
    return flow.astype(np.float32)


def write_flo(path: str | os.PathLike, flow: np.ndarray) -> Path:
    """Write an ``(H, W, 2)`` flow as Middlebury ``.flo`` (parent dirs are created)."""
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"write_flo expects a flow of shape (H, W, 2), got {flow.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = flow.shape[:2]
    header = np.array([FLO_MAGIC], "<f4").tobytes() + np.array([width, height], "<i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(flow, "<f4").tobytes())
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A frame (PNG, PPM, JPEG, ...) as ``(H, W, 3)`` float32 RGB in [0, 255]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such frame: {path}")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from None
    return rgb


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 picture (format from the suffix, parent dirs are created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, np.uint8)).save(path)
    return path


def make_colorwheel() -> np.ndarray:
    """The Middlebury colour wheel (Baker et al. 2011): 55 hues, ``(55, 3)`` in [0, 255].

    Segments red-yellow, yellow-green, green-cyan, cyan-blue, blue-magenta, magenta-red.
    """
    # (count, channel that changes, rising?, the other channels' value) per segment, as in Baker et al.'s code.
    segments = [(15, 1, True, (255, None, 0)), (6, 0, False, (None, 255, 0)), (4, 2, True, (0, 255, None)),
                (11, 1, False, (0, None, 255)), (13, 0, True, (None, 0, 255)), (6, 2, False, (255, 0, None))]
    rows = []
    for count, channel, rising, fixed in segments:
        ramp = np.floor(255 * np.arange(count) / count)
        block = np.array([[0.0 if value is None else value for value in fixed]] * count)
        block[:, channel] = ramp if rising else 255 - ramp
        rows.append(block)
    return np.concatenate(rows).astype(np.float64)


def flow_to_color(flow: np.ndarray, max_radius: float | None = None) -> np.ndarray:
    """Middlebury colour coding of an ``(H, W, 2)`` flow -> ``(H, W, 3)`` uint8 RGB.

    Hue is the direction, saturation the magnitude relative to ``max_radius``
    (default: the largest magnitude in the flow); magnitudes beyond it are darkened.
    """
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow_to_color expects a flow of shape (H, W, 2), got {flow.shape}")
    u, v = flow[..., 0], flow[..., 1]
    finite = np.isfinite(u) & np.isfinite(v)
    u, v = np.where(finite, u, 0.0), np.where(finite, v, 0.0)
    radius = np.hypot(u, v)
    if max_radius is None:
        max_radius = float(radius.max())
    scale = 1.0 / (max_radius + 1e-5)
    u, v, radius = u * scale, v * scale, radius * scale

    wheel = make_colorwheel()
    num_colors = wheel.shape[0]
    angle = np.arctan2(-v, -u) / np.pi
    position = (angle + 1) / 2 * (num_colors - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = (k0 + 1) % num_colors
    weight = (position - k0)[..., None]
    color = ((1 - weight) * wheel[k0] + weight * wheel[k1]) / 255.0
    inside = (radius <= 1)[..., None]
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    color = np.where(finite[..., None], color, 0.0)
    return np.floor(255 * color).astype(np.uint8)
