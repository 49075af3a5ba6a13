"""Run outputs a person reads: ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes. On resume, rows logged after the restored checkpoint
are dropped first, so a killed-and-resumed run leaves the same file as an
uninterrupted one (no duplicated steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        if not self.enabled:
            return
        kept = [row for row in read_metrics(workdir) if row.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
        row = {"step": int(step), **{prefix + k: _plain(v) for k, v in values.items()}}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        return row

    def write_images(self, step: int, images: dict[str, Any]) -> None:
        """(H, W, 3) uint8 images into TensorBoard's image tab (metrics.jsonl stays scalars only)."""
        if not self.enabled:
            return
        for name, image in images.items():
            self._tb.add_image(name, np.asarray(image), int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
