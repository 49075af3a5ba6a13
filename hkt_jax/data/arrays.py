"""In-memory examples (a dict of equally long arrays) as a resumable grain train stream and eval passes.

Why: tasks whose data fits in memory (synthetic sets, toy problems, small
fixtures) need the same contract as the CIFAR pipeline — a seeded train stream
whose position survives a checkpoint, and padded eval passes whose ``mask``
marks real examples — without its image-specific augmentation. Order, slices
and resume are ``hkt_jax.data.stream``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from hkt_jax.data.stream import ProcessSlice, ShardedEpochs, TrainStream, padded_passes


def _length(arrays: dict[str, np.ndarray], name: str) -> int:
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1 or not arrays:
        raise ValueError(f"{name} arrays must be non-empty and equally long, got lengths "
                         f"{ {k: len(v) for k, v in arrays.items()} }")
    return lengths.pop()


class ArrayDatasets:
    """A ``Datasets`` over in-memory splits; keyword ``info`` (e.g. ``num_classes``) become attributes.

    The run's ``seed`` itself seeds the epoch order (no augmentation, so no second seed).
    """

    def __init__(self, splits: dict[str, dict[str, np.ndarray]], *, global_batch_size: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None, **info: Any):
        self._layout = ProcessSlice.of(global_batch_size, process_index, process_count)
        self._splits = splits
        train = splits["train"]
        self.num_train = _length(train, "train")
        epochs = ShardedEpochs(self.num_train, seed, self._layout)

        def build_batch(step: int) -> dict[str, np.ndarray]:
            rows = epochs.examples(step)
            return {k: v[rows] for k, v in train.items()}

        fingerprint = {"seed": seed, "global_batch_size": global_batch_size, "num_train": self.num_train}
        self.train = TrainStream.of_steps(build_batch, fingerprint=fingerprint)
        self.num_validation = _length(splits["validation"], "validation") if splits.get("validation") else 0
        self.num_test = _length(splits["test"], "test")
        for key, value in info.items():
            setattr(self, key, value)

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        """One fixed-order pass; the last global batch is padded and ``mask`` is 1 for real examples."""
        arrays = self._splits.get(split)
        if not arrays:
            raise ValueError(f"no {split!r} split in this data")

        def build(rows: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
            batch = {k: np.where(mask.reshape(-1, *[1] * (v.ndim - 1)), v[rows], 0).astype(v.dtype)
                     for k, v in arrays.items()}
            batch["mask"] = mask.astype(np.float32)
            return batch

        return padded_passes(_length(arrays, split), self._layout, build)
