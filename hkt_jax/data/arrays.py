"""In-memory examples (a dict of equally long arrays) as a resumable grain train stream and eval passes.

Why: tasks whose data fits in memory (synthetic sets, toy problems, small
fixtures) need the same contract as the CIFAR pipeline — a seeded train stream
whose position survives a checkpoint, and padded eval passes whose ``mask``
marks real examples — without its image-specific augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from hkt_jax.data.pipeline import TrainIterator, check_process_layout

_ENDLESS = 2**62
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def _length(arrays: dict[str, np.ndarray], name: str) -> int:
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1 or not arrays:
        raise ValueError(f"{name} arrays must be non-empty and equally long, got lengths "
                         f"{ {k: len(v) for k, v in arrays.items()} }")
    return lengths.pop()


class _TrainSlices:
    """This process's slice of global batch ``step``: an epoch-wise seeded permutation."""

    def __init__(self, arrays, seed, global_batch_size, process_index, process_count):
        self._arrays, self._seed = arrays, seed
        self._n = _length(arrays, "train")
        self._global = global_batch_size
        self._per_process = global_batch_size // process_count
        self._offset = process_index * self._per_process

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        start = step * self._global + self._offset
        epochs, offsets = np.divmod(np.arange(start, start + self._per_process), self._n)
        rows = np.empty(self._per_process, np.int64)
        for epoch in np.unique(epochs).tolist():
            order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            rows[epochs == epoch] = order[offsets[epochs == epoch]]
        return {k: v[rows] for k, v in self._arrays.items()}


class ArrayDatasets:
    """Same interface as ``hkt_jax.data.pipeline.Datasets`` for in-memory splits."""

    def __init__(self, splits: dict[str, dict[str, np.ndarray]], *, global_batch_size: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None, **info: Any):
        process_index, process_count = check_process_layout(global_batch_size, process_index, process_count)
        self._splits = splits
        self._global, self._process_index, self._process_count = global_batch_size, process_index, process_count
        builder = _TrainSlices(splits["train"], seed, global_batch_size, process_index, process_count)
        stream = grain.MapDataset.range(_ENDLESS).map(builder).to_iter_dataset(_READ_OPTIONS)
        fingerprint = {"seed": seed, "global_batch_size": global_batch_size, "num_train": builder._n}
        self.train = TrainIterator(stream, fingerprint)
        self.num_train = builder._n
        self.num_validation = _length(splits["validation"], "validation") if splits.get("validation") else 0
        self.num_test = _length(splits["test"], "test")
        for key, value in info.items():
            setattr(self, key, value)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """One fixed-order pass; the last global batch is padded and ``mask`` is 1 for real examples."""
        arrays = self._splits.get(split)
        if not arrays:
            raise ValueError(f"no {split!r} split in this data")
        n = _length(arrays, split)
        per_process = self._global // self._process_count
        for step in range(math.ceil(n / self._global)):
            positions = step * self._global + self._process_index * per_process + np.arange(per_process)
            mask = positions < n
            rows = np.minimum(positions, n - 1)
            batch = {k: np.where(mask.reshape(-1, *[1] * (v.ndim - 1)), v[rows], 0).astype(v.dtype)
                     for k, v in arrays.items()}
            batch["mask"] = mask.astype(np.float32)
            yield batch
