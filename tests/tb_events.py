"""Reads the image summaries of a run's TensorBoard event files (TFRecord framing + tensorboardX's protos),
so tests can check what TensorBoard would show without installing TensorBoard."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2


def _records(path: Path):
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        yield data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4  # length, its CRC, the record, its CRC


def images(workdir: str | Path) -> dict[str, dict[int, np.ndarray]]:
    """{tag: {step: (H, W, C) uint8}} of every image summary under ``workdir/tensorboard``."""
    found: dict[str, dict[int, np.ndarray]] = {}
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("image"):
                    image = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
                    found.setdefault(value.tag, {})[event.step] = image
    return found
