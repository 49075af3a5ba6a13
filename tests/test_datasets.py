"""The ``Datasets`` protocol and the shared train-stream bookkeeping (``hkt_jax.data.stream``).

Why the checksums: the four input pipelines (classification, in-memory arrays, optical flow, CT slices)
were moved onto one shared piece; ``tests/fixtures/pipeline_checksums.json`` was written by
``python -m tests.test_datasets`` from the code before that move, so each pipeline must still give the same
batches, in the same order, with the same numbers, and the same iterator state. The flow entries were
written again (2026-12-06) when the synthetic flow frames and the colour jitter stopped using BLAS, whose
kernels OpenBLAS picks per CPU model: the old entries held on one CPU kind only (images moved by <= 3.2e-4
of 255, flows, masks and every iterator state unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hkt_jax.data import Datasets, ProcessSlice, ResumableIterator, ShardedEpochs
from hkt_jax.data.arrays import ArrayDatasets
from hkt_jax.data.pipeline import DataConfig, make_datasets
from hkt_jax.data.volumes import SliceSet
from hkt_jax.tasks.flow_data import FlowDataConfig, FlowDatasets
from hkt_jax.tasks.segmentation import SegDatasets, SegSettings

FIXTURE = Path(__file__).parent / "fixtures" / "pipeline_checksums.json"
TRAIN_BATCHES = 6
LAYOUTS = ((0, 1), (0, 2), (1, 2))  # (process_index, process_count)


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = np.ascontiguousarray(batch[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:20]


def record(datasets, eval_splits: tuple[str, ...]) -> dict:
    """Digests of the first train batches, the state after them, the next batch, and every eval batch."""
    train = [batch_digest(next(datasets.train)) for _ in range(TRAIN_BATCHES)]
    state = datasets.train.get_state()
    after = batch_digest(next(datasets.train))
    evals = {split: [batch_digest(b) for b in datasets.eval_batches(split)] for split in eval_splits}
    return {
        "train": train,
        "state": json.loads(json.dumps(state)),
        "after_state": after,
        "eval": evals,
        "sizes": [datasets.num_train, datasets.num_validation, datasets.num_test],
    }


def classification(augment: bool, process_index: int, process_count: int):
    config = DataConfig(
        source="synthetic", synthetic_train_size=50, synthetic_test_size=21, validation_size=11, augment=augment
    )
    return make_datasets(config, global_batch_size=8, seed=3, process_index=process_index, process_count=process_count)


def arrays(process_index: int, process_count: int):
    rng = np.random.default_rng(7)

    def split(n):
        return {"image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32), "label": rng.integers(0, 5, n)}

    return ArrayDatasets(
        {"train": split(19), "validation": split(7), "test": split(9)},
        global_batch_size=4,
        seed=5,
        process_index=process_index,
        process_count=process_count,
    )


def flow(augment: bool, process_index: int, process_count: int):
    config = FlowDataConfig(
        synthetic_train_size=10,
        synthetic_test_size=5,
        validation_size=3,
        frame_size=(64, 64),
        crop_size=(64, 64),
        augment=augment,
    )
    return FlowDatasets(config, global_batch_size=4, seed=2, process_index=process_index, process_count=process_count)


def slices(process_index: int, process_count: int):
    rng = np.random.default_rng(11)
    count, cases = 40, 8
    masks = (rng.random((count, 8, 8)) < 0.1).astype(np.uint8) * rng.integers(1, 3, (count, 1, 1)).astype(np.uint8)
    masks[::3] = 0
    slice_set = SliceSet(
        rng.random((count, 8, 8, 1)).astype(np.float32),
        masks,
        np.repeat(np.arange(cases, dtype=np.int32), count // cases),
        tuple(str(c) for c in range(cases)),
        3,
    )
    settings = SegSettings(validation_cases=2, test_cases=2)
    return SegDatasets(
        slice_set,
        settings,
        global_batch_size=4,
        seed=9,
        split_seed=0,
        process_index=process_index,
        process_count=process_count,
    )


def pipelines():
    """name -> (builder(process_index, process_count), eval splits)."""
    both = ("validation", "test")
    return {
        "classification_augment": (lambda i, n: classification(True, i, n), both),
        "classification_plain": (lambda i, n: classification(False, i, n), both),
        "arrays": (arrays, both),
        "flow_augment": (lambda i, n: flow(True, i, n), both),
        "flow_plain": (lambda i, n: flow(False, i, n), ("test",)),
        "slices": (slices, both),
    }


def compute_checksums() -> dict:
    return {
        f"{name}/{index}of{count}": record(build(index, count), splits)
        for name, (build, splits) in pipelines().items()
        for index, count in LAYOUTS
    }


def test_every_pipeline_gives_the_batches_and_states_it_gave_before_the_shared_stream():
    expected = json.loads(FIXTURE.read_text())
    actual = compute_checksums()
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == expected[key], key


def test_batches_do_not_depend_on_the_cpus_blas_kernels():
    """A seed gives the same batches on every x86-64-v3 machine, or a run resumed on another kind of machine
    would not continue the same run: OpenBLAS picks its kernels by CPU model, so force another family."""
    code = "import json; from tests.test_datasets import compute_checksums; print(json.dumps(compute_checksums()))"
    env = {**os.environ, "OPENBLAS_CORETYPE": "Sandybridge"}  # AVX without FMA: rounds unlike Haswell/Zen/SkylakeX
    root = Path(__file__).parent.parent
    other = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert json.loads(other.stdout.strip().splitlines()[-1]) == compute_checksums()


def test_a_classification_state_saved_by_the_code_before_the_shared_stream_resumes_on_the_right_batch():
    """Checkpoints of runs in progress hold the iterator state in this literal format (orbax JSON)."""
    expected = json.loads(FIXTURE.read_text())
    saved = {"iterator": {"next_index": 5}, "pipeline": {"seed": 3, "global_batch_size": 8, "num_train": 39}}
    for layout in ((0, 1), (1, 2)):
        resumed = classification(True, *layout)
        resumed.train.set_state(json.loads(json.dumps(saved)))
        assert (
            batch_digest(next(resumed.train))
            == expected[f"classification_augment/{layout[0]}of{layout[1]}"]["train"][5]
        )
        assert resumed.train.get_state()["iterator"] == {"next_index": 6}
    with pytest.raises(ValueError, match="resuming would give different batches"):
        classification(True, 0, 1).train.set_state(saved | {"pipeline": saved["pipeline"] | {"seed": 4}})


def test_every_task_data_is_a_datasets_with_a_resumable_stream():
    for build, _ in pipelines().values():
        datasets = build(0, 1)
        assert isinstance(datasets, Datasets) and isinstance(datasets.train, ResumableIterator)


def test_process_slices_tile_each_global_batch_and_every_epoch_is_a_permutation():
    slices = [ShardedEpochs(7, shuffle_seed=1, layout=ProcessSlice(4, index, 2)) for index in range(2)]
    stream = np.concatenate([np.concatenate([s.examples(step) for s in slices]) for step in range(7)])  # 4 epochs
    assert [sorted(stream[e * 7 : (e + 1) * 7].tolist()) for e in range(4)] == [list(range(7))] * 4
    assert [slices[1].example(slices[1].layout.position(k)) for k in range(4)] == stream[[2, 3, 6, 7]].tolist()
    rows, mask = ProcessSlice(4, 1, 2).eval_rows(1, num_examples=6)
    assert rows.tolist() == [5, 5] and mask.tolist() == [False, False]
    with pytest.raises(ValueError, match="positive multiple of the process count 3"):
        ProcessSlice(4, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        ProcessSlice(4, 2, 2)
    with pytest.raises(ValueError, match="empty"):
        ShardedEpochs(0, 1, ProcessSlice(4))


if __name__ == "__main__":  # writes the fixture: only from the code the fixture is meant to pin
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(compute_checksums(), indent=1, sort_keys=True) + "\n")
    sys.stdout.write(f"wrote {FIXTURE}\n")
