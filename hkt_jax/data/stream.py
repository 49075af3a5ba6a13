"""What every input pipeline shares: the ``Datasets`` protocol, the process slice of a global batch, the
epoch-wise shuffled order, the resumable grain train stream and padded eval passes.

Why one piece: the classification, in-memory, optical-flow and CT-slice pipelines all read one infinite
global stream in which global batch ``s`` is positions ``[s*G, (s+1)*G)`` and process ``p`` of ``P``
builds only its contiguous ``G/P`` slice. A batch is then a pure function of (seed, step), the iterator
state is grain's step index, and a killed run resumes on exactly the next batch, even with another
process count. Position ``i`` of a shuffled stream is example ``permutation(seed, epoch=i // N)[i % N]``
(``ShardedEpochs``); the order is numpy's seeded permutation rather than ``grain.MapDataset.shuffle``
because runs in progress must keep their batches, and a process takes a contiguous part of each global
batch rather than grain's strided ``slice``, so the global batch stays one function of the step for any
process count. grain does the rest: ``MapDataset.range`` of steps, its per-step RNG (``random_map``) for
augmentation drawn for the whole global batch, ``batch`` for per-example pipelines, prefetch threads,
and the iterator state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import grain
import numpy as np

Batch = dict[str, np.ndarray]
#: Number of train steps; effectively infinite.
ENDLESS = 2**62
#: One prefetch thread overlaps input work with the train step.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@runtime_checkable
class ResumableIterator(Protocol):
    """Endless train batches whose position survives a checkpoint (``get_state`` is JSON-serialisable)."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Datasets(Protocol):
    """What the training loop reads from a task's data (``Task.make_datasets``): the train stream, padded
    eval passes whose batches mark real examples (``mask``, or ``valid`` for CT slices), and split sizes.
    Task-specific facts (classes, image shape, flow iterations) live on the concrete classes."""

    train: ResumableIterator
    num_train: int
    num_validation: int
    num_test: int

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """One fixed-order pass over ``"validation"`` or ``"test"``."""
        ...


def _check_divisible(global_batch_size: int, process_count: int) -> None:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"process count {process_count}, so each process gets an equal slice."
        )


def check_process_layout(
    global_batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
    """(process_index, process_count), from JAX when not given, checked against the global batch."""
    if process_index is None or process_count is None:
        import jax  # deferred: only needed to discover the process layout

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
    _check_divisible(global_batch_size, process_count)
    return process_index, process_count


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
    """This process's contiguous ``G / P`` slice of every global batch of ``G`` positions."""

    global_batch_size: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        check_process_layout(self.global_batch_size, self.process_index, self.process_count)

    @classmethod
    def of(
        cls, global_batch_size: int, process_index: int | None = None, process_count: int | None = None
    ) -> ProcessSlice:
        """The slice for this process; index and count default to JAX's."""
        return cls(global_batch_size, *check_process_layout(global_batch_size, process_index, process_count))

    @property
    def per_process(self) -> int:
        return self.global_batch_size // self.process_count

    @property
    def part(self) -> slice:
        """This process's rows of something drawn for the whole global batch (e.g. augmentation draws)."""
        start = self.process_index * self.per_process
        return slice(start, start + self.per_process)

    def positions(self, step: int) -> np.ndarray:
        """Stream positions of this process's slice of global batch ``step``."""
        start = int(step) * self.global_batch_size + self.process_index * self.per_process
        return np.arange(start, start + self.per_process)

    def position(self, local_index: int) -> int:
        """Stream position of element ``local_index`` of this process's own (batched) stream."""
        step, within = divmod(int(local_index), self.per_process)
        return step * self.global_batch_size + self.process_index * self.per_process + within

    def eval_steps(self, num_examples: int) -> int:
        """Global batches in one pass over ``num_examples``; the last is padded."""
        return math.ceil(num_examples / self.global_batch_size)

    def eval_rows(self, step: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, mask) of this process's slice of padded eval batch ``step``: padding repeats the last
        example and is ``False`` in ``mask``, so every process yields equally many equally shaped batches."""
        positions = self.positions(step)
        mask = positions < num_examples
        return np.minimum(positions, num_examples - 1), mask


class ShardedEpochs:
    """Position ``i`` of the endless stream -> example ``permutation(shuffle_seed, i // N)[i % N]``.

    A fresh seeded permutation per epoch; a global batch may straddle two epochs. The few newest
    permutations are cached (thread-safe), since prefetch threads read neighbouring batches.
    """

    def __init__(self, num_examples: int, shuffle_seed: int, layout: ProcessSlice):
        if num_examples <= 0:
            raise ValueError(f"the train split is empty: nothing to shuffle (got {num_examples} examples)")
        self.num_examples = num_examples
        self.layout = layout
        self._shuffle_seed = shuffle_seed
        self._order = functools.lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._shuffle_seed, epoch]).permutation(self.num_examples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self._order(int(epoch))

    def example(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.num_examples)
        return int(self._order(epoch)[offset])

    def examples(self, step: int) -> np.ndarray:
        """Example indices of this process's slice of global batch ``step``."""
        epochs, offsets = np.divmod(self.layout.positions(step), self.num_examples)
        examples = np.empty(len(offsets), np.int64)
        for epoch in np.unique(epochs).tolist():
            in_epoch = epochs == epoch
            examples[in_epoch] = self._order(epoch)[offsets[in_epoch]]
        return examples


def shuffle_and_augment_seeds(seed: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) derived from a run's seed, so order and augmentation are independent."""
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    return shuffle_seed, augment_seed


class TrainStream:
    """Endless training batches whose position survives a checkpoint.

    ``get_state()`` is a JSON-serialisable dict ``{"iterator": grain's state, "pipeline": fingerprint}``;
    ``set_state()`` on a fresh stream built with the same data, seed and global batch size resumes on
    exactly the next batch, and refuses a state saved for other data (another fingerprint).
    """

    def __init__(self, dataset: grain.IterDataset, fingerprint: dict[str, Any]):
        self._iterator = iter(dataset)
        self._fingerprint = fingerprint

    @classmethod
    def of_steps(
        cls,
        build_batch: Callable[..., Batch],
        *,
        fingerprint: dict[str, Any],
        rng_seed: int | None = None,
        read_options: grain.ReadOptions = READ_OPTIONS,
    ) -> TrainStream:
        """Batch ``s`` = ``build_batch(s)``, or ``build_batch(s, rng)`` with grain's per-step RNG seeded by
        ``rng_seed`` (augmentation, sampling); the builder works on whole batches (vectorised numpy)."""
        steps = grain.MapDataset.range(ENDLESS)
        steps = steps.map(build_batch) if rng_seed is None else steps.random_map(build_batch, seed=rng_seed)
        return cls(steps.to_iter_dataset(read_options), fingerprint)

    @classmethod
    def of_examples(
        cls,
        build_example: Callable[[int], Batch],
        stack: Callable[[list[Batch]], Batch],
        *,
        per_process: int,
        fingerprint: dict[str, Any],
        read_options: grain.ReadOptions = READ_OPTIONS,
    ) -> TrainStream:
        """Element ``k`` of this process's stream = ``build_example(k)`` (``ProcessSlice.position`` maps it
        to the global stream), ``per_process`` of them stacked per batch; for costly examples that grain's
        threads build in parallel."""
        batches = grain.MapDataset.range(ENDLESS).map(build_example).batch(per_process, batch_fn=stack)
        return cls(batches.to_iter_dataset(read_options), fingerprint)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"iterator": self._iterator.get_state(), "pipeline": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("pipeline") != self._fingerprint:
            raise ValueError(
                f"Train iterator state was saved for pipeline {state.get('pipeline')}, "
                f"but this one is {self._fingerprint}; resuming would give different batches."
            )
        self._iterator.set_state(state["iterator"])


def padded_passes(
    num_examples: int,
    layout: ProcessSlice,
    build_batch: Callable[[np.ndarray, np.ndarray], Batch],
    read_options: grain.ReadOptions = READ_OPTIONS,
) -> Iterator[Batch]:
    """One fixed-order pass: batch ``s`` = ``build_batch(rows, mask)`` of ``layout.eval_rows(s)``, prefetched
    (no batch for no examples)."""

    def build(step: int) -> Batch:
        return build_batch(*layout.eval_rows(step, num_examples))

    steps = grain.MapDataset.range(layout.eval_steps(num_examples))
    return iter(steps.map(build).to_iter_dataset(read_options))
