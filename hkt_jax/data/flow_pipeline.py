"""grain pipelines for optical flow: an endless augmented train stream and padded eval passes.

On the shared stream (``hkt_jax.data.stream``): position ``i`` of the infinite
train stream is example ``permutation(seed, epoch=i // N)[i % N]``; global
batch ``s`` is positions ``[s*G, (s+1)*G)`` and process ``p`` of ``P`` builds
only its contiguous ``G/P`` slice. Each position is augmented with
``np.random.default_rng([augment_seed, position])``, so every batch is a pure
function of (seed, step): the iterator state is grain's batch index, a killed
run resumes on exactly the next batch, even with another process count.
Flow samples are costly (file decoding, resizing), so batches are built
per example and prefetched by grain's threads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from hkt_jax.data.flow_augment import AugmentConfig, augment
from hkt_jax.data.stream import ProcessSlice, ShardedEpochs, TrainStream, padded_passes, shuffle_and_augment_seeds

BATCH_KEYS = ("image1", "image2", "flow", "valid")
# RAFT's InputPadder: "sintel" pads evenly on all sides, "kitti" left/right and bottom only.
PAD_MODES = ("sintel", "kitti")


class FlowSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


def _stack(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    shapes = {s["image1"].shape for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"flow batch of differently sized frames {sorted(shapes)}: set a crop size or pad")
    return {key: np.stack([s[key] for s in samples]).astype(np.float32) for key in samples[0]}


@dataclasses.dataclass(frozen=True)
class MixturePart:
    """One dataset of a training mixture, repeated ``times`` and augmented its own way."""

    name: str
    source: FlowSource
    times: int
    augment: AugmentConfig | None

    def __len__(self) -> int:
        return self.times * len(self.source)


@dataclasses.dataclass(frozen=True)
class FlowMixture:
    """RAFT's training mixtures (``100*sintel_clean + 100*sintel_final + 200*kitti + 5*hd1k + things``):
    the parts one after the other, each repeated, and every sample augmented with its own part's settings
    (KITTI and HD1K sparse, Sintel and Things dense), as RAFT's ``FlowDataset.__rmul__`` and per-dataset
    ``aug_params`` do."""

    parts: tuple[MixturePart, ...]

    def __post_init__(self):
        if not self.parts or any(p.times < 1 or len(p.source) == 0 for p in self.parts):
            raise ValueError(f"a flow mixture needs non-empty parts repeated >= 1 times, got {self.describe()}")

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def locate(self, index: int) -> tuple[MixturePart, int]:
        """The part holding mixture ``index`` and the index inside that part's own dataset."""
        for part in self.parts:
            if index < len(part):
                return part, index % len(part.source)
            index -= len(part)
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        part, inner = self.locate(index)
        return part.source[inner]

    def describe(self) -> str:
        return " + ".join(f"{p.times}*{p.name}({len(p.source)})" for p in self.parts)


class _TrainExample:
    """Element ``k`` of this process's stream -> augmented sample of its global position."""

    def __init__(self, source: FlowSource, config: AugmentConfig | None, epochs: ShardedEpochs, augment_seed: int):
        self._source = source
        self._config = config
        self._epochs = epochs
        self._augment_seed = augment_seed

    def __call__(self, local_index: int) -> dict[str, np.ndarray]:
        position = self._epochs.layout.position(local_index)
        index = self._epochs.example(position)
        sample = self._source[index]
        config = self._source.locate(index)[0].augment if isinstance(self._source, FlowMixture) else self._config
        if config is not None:
            sample = augment(sample, np.random.default_rng([self._augment_seed, position]), config)
        return {key: sample[key] for key in BATCH_KEYS}


def make_flow_train_iterator(
    source: FlowSource,
    augment_config: AugmentConfig | None,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch_batches: int = 2,
) -> TrainStream:
    """Endless batches ``{"image1", "image2", "flow", "valid"}`` of ``G / P`` examples, resumable.

    Without augmentation the source's samples must all have one size.
    """
    if len(source) == 0:
        raise ValueError("make_flow_train_iterator: the flow source is empty")
    layout = ProcessSlice(global_batch_size, process_index, process_count)
    shuffle_seed, augment_seed = shuffle_and_augment_seeds(seed)
    example = _TrainExample(source, augment_config, ShardedEpochs(len(source), shuffle_seed, layout), augment_seed)
    fingerprint: dict[str, Any] = {
        "seed": seed,
        "global_batch_size": global_batch_size,
        "num_train": len(source),
        "augment": repr(augment_config),
    }
    if isinstance(source, FlowMixture):
        fingerprint["mixture"] = [(p.name, p.times, len(p.source), repr(p.augment)) for p in source.parts]
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return TrainStream.of_examples(example, _stack, per_process=layout.per_process, fingerprint=fingerprint,
                                   read_options=options)


def pad_sample(sample: dict[str, np.ndarray], height: int, width: int, mode: str = "sintel") -> dict[str, np.ndarray]:
    """RAFT's InputPadder on one sample: frames edge-replicated, flow 0 and ``valid`` 0 in the padding.

    Adds ``region`` = (top, left, height, width) of the original frame.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode {mode!r}: expected one of {PAD_MODES}")
    original_height, original_width = sample["image1"].shape[:2]
    pad_height, pad_width = height - original_height, width - original_width
    if pad_height < 0 or pad_width < 0:
        raise ValueError(f"cannot pad a {original_height}x{original_width} frame to {height}x{width}")
    top = pad_height // 2 if mode == "sintel" else 0
    left = pad_width // 2
    spatial = ((top, pad_height - top), (left, pad_width - left))
    out = {
        "image1": np.pad(sample["image1"], spatial + ((0, 0),), mode="edge"),
        "image2": np.pad(sample["image2"], spatial + ((0, 0),), mode="edge"),
        "flow": np.pad(sample["flow"], spatial + ((0, 0),)),
        "valid": np.pad(sample["valid"], spatial),
        "region": np.array([top, left, original_height, original_width], np.int32),
    }
    return out


@functools.cache
def _ceil8(value: int) -> int:
    return 8 * math.ceil(value / 8)


class _EvalBatch:
    """This process's slice of a padded global eval batch; ``mask`` marks real examples."""

    def __init__(self, source, pad_mode, pad_to):
        self._source = source
        self._pad_mode = pad_mode
        self._pad_to = pad_to

    def __call__(self, rows: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        samples = [self._source[int(row)] for row in rows]
        if self._pad_to is not None:
            height, width = self._pad_to
        else:
            height = _ceil8(max(s["image1"].shape[0] for s in samples))
            width = _ceil8(max(s["image1"].shape[1] for s in samples))
        padded = [pad_sample(s, height, width, self._pad_mode) for s in samples]
        batch = {key: np.stack([p[key] for p in padded]) for key in padded[0]}
        batch["valid"] = batch["valid"] * mask[:, None, None]
        batch["mask"] = mask.astype(np.float32)
        return batch


def flow_eval_batches(
    source: FlowSource,
    *,
    global_batch_size: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    pad_mode: str = "sintel",
    pad_to: tuple[int, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass in fixed order; frames padded to multiples of 8 (or to ``pad_to``).

    Batches: ``image1``, ``image2``, ``flow``, ``valid`` (0 in the padding and for
    padded examples), ``region`` (per example: top, left, height, width) and
    ``mask``. Summing masked metric sums over all batches and processes counts
    every real pixel once. Multi-process runs need ``pad_to`` so all slices
    share a shape.
    """
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad mode {pad_mode!r}: expected one of {PAD_MODES}")
    if len(source) == 0:
        raise ValueError("flow_eval_batches: the flow source is empty")
    layout = ProcessSlice(global_batch_size, process_index, process_count)
    return padded_passes(len(source), layout, _EvalBatch(source, pad_mode, pad_to))
