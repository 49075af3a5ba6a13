"""A small PNG codec for 8/16-bit gray/RGB(A) images, in NumPy + zlib.

KITTI and HD1K store flow as 16-bit RGB PNGs, which Pillow decodes to 8 bits
(it keeps only the high byte), and OpenCV is not a dependency here. This codec
reads any non-interlaced, non-palette PNG at full depth and writes one with
libpng's default per-row filter choice (smallest sum of absolute residuals).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS_BY_COLOR_TYPE = {0: 1, 2: 3, 4: 2, 6: 4}
_COLOR_TYPE_BY_CHANNELS = {1: 0, 3: 2, 2: 4, 4: 6}
_NONE, _SUB, _UP, _AVERAGE, _PAETH = range(5)


def _chunks(data: bytes, path: Path):
    """(type, payload) of each chunk, checking lengths and CRCs."""
    offset = len(PNG_SIGNATURE)
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: truncated PNG (chunk header at byte {offset})")
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        end = offset + 12 + length
        if end > len(data):
            raise ValueError(f"{path}: truncated PNG ({kind!r} chunk needs {length} bytes)")
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt PNG (bad CRC in the {kind!r} chunk)")
        yield kind, payload
        if kind == b"IEND":
            return
        offset = end
    raise ValueError(f"{path}: truncated PNG (no IEND chunk)")


def _paeth(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    distance_left = np.abs(up - up_left)  # |p - a| with p = a + b - c
    distance_up = np.abs(left - up_left)
    distance_up_left = np.abs(left + up - 2 * up_left)
    return np.where(
        (distance_left <= distance_up) & (distance_left <= distance_up_left),
        left,
        np.where(distance_up <= distance_up_left, up, up_left),
    )


def _unfilter(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Undoes per-row PNG filters on ``(H, W, bytes_per_pixel)`` uint8.

    Each byte depends on its left, upper and upper-left neighbours, so all
    pixels on one anti-diagonal are independent: H + W - 1 vectorised steps.
    """
    if not filters.any():
        return filtered
    height, width, _ = filtered.shape
    recon = np.zeros((height + 1, width + 1, filtered.shape[2]), np.int32)  # zero row/column before the image
    residuals = filtered.astype(np.int32)
    for diagonal in range(height + width - 1):
        rows = np.arange(max(0, diagonal - width + 1), min(height - 1, diagonal) + 1)
        cols = diagonal - rows
        left, up, up_left = recon[rows + 1, cols], recon[rows, cols + 1], recon[rows, cols]
        kind = filters[rows][:, None]
        prediction = np.select(
            [kind == _SUB, kind == _UP, kind == _AVERAGE, kind == _PAETH],
            [left, up, (left + up) >> 1, _paeth(left, up, up_left)],
            0,
        )
        recon[rows + 1, cols + 1] = (residuals[rows, cols] + prediction) & 0xFF
    return recon[1:, 1:].astype(np.uint8)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG as ``(H, W, C)`` uint8 or uint16 (its own bit depth), C in {1, 2, 3, 4}."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file (bad signature)")
    header, compressed = None, []
    for kind, payload in _chunks(data, path):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload)
        elif kind == b"IDAT":
            compressed.append(payload)
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR chunk")
    width, height, bit_depth, color_type, _, _, interlace = header
    if color_type not in _CHANNELS_BY_COLOR_TYPE or bit_depth not in (8, 16) or interlace:
        raise ValueError(
            f"{path}: unsupported PNG (bit depth {bit_depth}, colour type {color_type}, interlace {interlace}); "
            "expected 8/16-bit gray or RGB(A), not interlaced"
        )
    channels = _CHANNELS_BY_COLOR_TYPE[color_type]
    bytes_per_pixel = channels * bit_depth // 8
    try:
        raw = zlib.decompress(b"".join(compressed))
    except zlib.error as error:
        raise ValueError(f"{path}: corrupt PNG image data ({error})") from None
    expected = height * (width * bytes_per_pixel + 1)
    if len(raw) != expected:
        raise ValueError(f"{path}: PNG image data has {len(raw)} bytes, expected {expected} for {width}x{height}")
    rows = np.frombuffer(raw, np.uint8).reshape(height, width * bytes_per_pixel + 1)
    filters = rows[:, 0]
    if filters.max() > _PAETH:
        raise ValueError(f"{path}: corrupt PNG (row filter {filters.max()})")
    pixels = _unfilter(rows[:, 1:].reshape(height, width, bytes_per_pixel), filters)
    if bit_depth == 16:
        return pixels.reshape(height, width * bytes_per_pixel).view(">u2").astype(np.uint16).reshape(
            height, width, channels
        )
    return np.array(pixels.reshape(height, width, channels))


def _filtered_candidates(pixels: np.ndarray) -> np.ndarray:
    """All five filters of every row: ``(5, H, W, bytes_per_pixel)`` uint8."""
    x = pixels.astype(np.int32)
    left = np.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    up = np.pad(x, ((1, 0), (0, 0), (0, 0)))[:-1]
    up_left = np.pad(x, ((1, 0), (1, 0), (0, 0)))[:-1, :-1]
    predictions = [np.zeros_like(x), left, up, (left + up) >> 1, _paeth(left, up, up_left)]
    return np.stack([(x - p) & 0xFF for p in predictions]).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``(H, W)`` or ``(H, W, C)`` uint8/uint16 as PNG at that depth (parent dirs are created)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 3 or image.shape[2] not in _COLOR_TYPE_BY_CHANNELS:
        raise ValueError(f"write_png expects uint8/uint16 (H, W[, 1-4]), got {image.dtype} {image.shape}")
    height, width, channels = image.shape
    bit_depth = 8 * image.itemsize
    pixels = np.ascontiguousarray(image, ">u2" if bit_depth == 16 else np.uint8).view(np.uint8)
    pixels = pixels.reshape(height, width, channels * image.itemsize)
    candidates = _filtered_candidates(pixels)
    signed_cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=(2, 3))  # (5, H)
    choice = np.argmin(signed_cost, axis=0)
    rows = candidates[choice, np.arange(height)].reshape(height, -1)
    raw = np.concatenate([choice.astype(np.uint8)[:, None], rows], axis=1).tobytes()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, _COLOR_TYPE_BY_CHANNELS[channels], 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )
    return path
