"""Optical-flow file formats: Middlebury ``.flo``, ``.pfm``, KITTI 16-bit PNG flow,
frames (PNG/PPM/JPEG), colour-wheel pictures.

Flows are ``(H, W, 2)`` float32 arrays, channels-last, pixels (x, y), the layout
RAFT and the flow datasets (FlyingChairs, Sintel) use. Readers fail with a
``ValueError`` naming the file when its contents do not fit the format.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from hkt_jax.data.png16 import read_png, write_png

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


# ----------------------------------------------------------------------------- FlyingThings3D .pfm
# Portable float map: "PF" (3 channels) or "Pf" (1), "W H", a scale whose sign gives the byte order
# (negative: little-endian), one whitespace byte, then float32 rows stored bottom row first.
_PFM_HEADER = re.compile(rb"^(P[Ff])\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s")


def read_pfm(path: str | os.PathLike) -> np.ndarray:
    """A ``.pfm`` file as float32, ``(H, W, 3)`` ("PF") or ``(H, W)`` ("Pf"), top row first."""
    path = Path(path)
    data = path.read_bytes()
    header = _PFM_HEADER.match(data[:256])
    if header is None:
        raise ValueError(f"{path}: not a .pfm file (expected 'PF'/'Pf', width height, scale)")
    kind, width, height, scale = header.groups()
    width, height, scale = int(width), int(height), float(scale)
    channels = 3 if kind == b"PF" else 1
    if width <= 0 or height <= 0 or scale == 0:
        raise ValueError(f"{path}: invalid .pfm header (size {width}x{height}, scale {scale})")
    expected = width * height * channels * 4
    payload = data[header.end() :]
    if len(payload) != expected:
        raise ValueError(f"{path}: .pfm header says {width}x{height}x{channels} ({expected} bytes of data) "
                         f"but the file has {len(payload)}")
    values = np.frombuffer(payload, "<f4" if scale < 0 else ">f4").reshape(height, width, channels)
    values = values[::-1].astype(np.float32)
    return values[..., 0] if channels == 1 else values


def write_pfm(path: str | os.PathLike, values: np.ndarray, *, little_endian: bool = True) -> Path:
    """Write ``(H, W)`` or ``(H, W, 3)`` floats as ``.pfm`` (parent dirs are created)."""
    values = np.asarray(values, np.float32)
    if not (values.ndim == 2 or (values.ndim == 3 and values.shape[2] == 3)):
        raise ValueError(f"write_pfm expects (H, W) or (H, W, 3), got {values.shape}")
    kind = b"Pf" if values.ndim == 2 else b"PF"
    height, width = values.shape[:2]
    header = kind + b"\n%d %d\n%s\n" % (width, height, b"-1.0" if little_endian else b"1.0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + np.ascontiguousarray(values[::-1], "<f4" if little_endian else ">f4").tobytes())
    return path


# ----------------------------------------------------------------------------- KITTI / HD1K 16-bit PNG flow
# Channels R, G = u, v stored as 64 * flow + 2**15; B = 1 where the flow is known.
KITTI_FLOW_SCALE = 64.0
KITTI_FLOW_OFFSET = 2.0**15


def read_kitti_flow(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A KITTI flow PNG as (flow ``(H, W, 2)`` float32, valid ``(H, W)`` float32 in {0, 1})."""
    path = Path(path)
    values = read_png(path)
    if values.dtype != np.uint16 or values.shape[2] != 3:
        raise ValueError(f"{path}: not a KITTI flow PNG (expected 16-bit RGB, got {values.dtype} "
                         f"with {values.shape[2]} channels)")
    flow = (values[..., :2].astype(np.float32) - KITTI_FLOW_OFFSET) / KITTI_FLOW_SCALE
    valid = (values[..., 2] > 0).astype(np.float32)
    return flow, valid


def write_kitti_flow(path: str | os.PathLike, flow: np.ndarray, valid: np.ndarray | None = None) -> Path:
    """Write a KITTI flow PNG (rounded to 1/64 px, clipped to +-512 px; ``valid`` defaults to all)."""
    flow = np.asarray(flow, np.float64)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"write_kitti_flow expects a flow of shape (H, W, 2), got {flow.shape}")
    valid = np.ones(flow.shape[:2]) if valid is None else np.asarray(valid)
    encoded = np.clip(np.rint(flow * KITTI_FLOW_SCALE + KITTI_FLOW_OFFSET), 0, 2**16 - 1)
    values = np.concatenate([encoded, (valid > 0)[..., None]], axis=-1).astype(np.uint16)
    return write_png(path, values)


def read_flow(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Any flow file by suffix: (flow ``(H, W, 2)``, valid or None when the format has no mask).

    ``.flo`` (Middlebury), ``.pfm`` (FlyingThings3D: the third channel is dropped),
    ``.png`` (KITTI / HD1K 16-bit, with its valid mask).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".flo":
        return read_flo(path), None
    if suffix == ".pfm":
        values = read_pfm(path)
        if values.ndim != 3:
            raise ValueError(f"{path}: a one-channel .pfm is not a flow")
        return np.ascontiguousarray(values[..., :2]), None
    if suffix == ".png":
        return read_kitti_flow(path)
    raise ValueError(f"{path}: unknown flow format {suffix!r} (expected .flo, .pfm or .png)")
