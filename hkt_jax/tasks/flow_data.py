"""Train / validation / test flow data of an experiment config (``data.*`` for ``task="flow"``).

Why a ``DataConfig`` subclass: the task sees only ``config.data``, and a flow
run needs a few settings the image pipeline does not have (crop size, frame
size of the synthetic pairs, refinement iterations). Everything else (sizes,
seed, ``augment``) keeps its meaning, so ``data.*`` overrides work as for CIFAR.

Splits: ``synthetic`` draws three independent sets; ``chairs`` / ``things``
hold ``validation_size`` training pairs out for model selection and test on
their official evaluation split (Chairs validation, Things TEST);
``sintel`` / ``kitti`` / ``folder`` have no labelled test split, so test = the
held-out validation pairs (same pair indices in every Sintel/Things pass, so no
scene appears in both training and validation through another pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from hkt_jax.data.flow_augment import AugmentConfig, raft_augment_config
from hkt_jax.data.flow_datasets import LAYOUTS, open_flow_dataset
from hkt_jax.data.flow_pipeline import FlowMixture, MixturePart, flow_eval_batches, make_flow_train_iterator
from hkt_jax.data.pipeline import DataConfig
from hkt_jax.data.stream import ProcessSlice
from hkt_jax.data.synthetic_flow import SyntheticFlow

FLOW_SOURCES = ("synthetic", "chairs", "things", "sintel", "kitti", "folder")
# RAFT's sintel-stage training sets (core/datasets.py, fetch_dataloader): the datasets each one reads. The
# names are Table 1's columns: C+T+K/S for the Sintel submission, C+T+S+K+H before KITTI fine-tuning.
SINTEL_MIXES = {
    "sintel": ("sintel",),
    "C+T+K/S": ("sintel", "things"),
    "C+T+S+K+H": ("sintel", "things", "kitti", "hd1k"),
}
_HOLDOUT_SEED = 20_200_326  # fixed: the held-out pairs never depend on the run's seed


@dataclasses.dataclass(frozen=True)
class FlowDataConfig(DataConfig):
    """``data.*`` of a flow run. ``path``: the dataset root (``FlyingChairs_release``, ``FlyingThings3D``,
    ``Sintel``, ``KITTI``) or the folder of pairs; unused for ``synthetic``."""

    source: str = "synthetic"
    name: str = "flow"
    validation_size: int = 64
    synthetic_train_size: int = 1024
    synthetic_test_size: int = 128
    frame_size: tuple[int, int] = (64, 64)  # synthetic frames (H, W), multiples of 8, at least 64
    crop_size: tuple[int, int] = (368, 496)  # training crops (H, W), multiples of 8 (augment=True)
    augment_preset: str | None = None  # raft_augment_config name; None = the source's own (synthetic: chairs)
    passes: tuple[str, ...] = ("clean", "final")  # things / sintel
    iters: int = 12  # refinement iterations both networks unroll in training and validation
    # RAFT's sequence-loss decay (train_standard.sh: 0.8 for chairs and things, 0.85 for sintel and kitti). A
    # loss setting, kept in the flow run's own block so that no other task's config carries it.
    loss_gamma: float = 0.8
    # RAFT's sintel stage trains on a mixture (SINTEL_MIXES); "sintel" = Sintel alone. The other datasets'
    # roots are only read by the mixtures.
    sintel_mix: str = "sintel"
    things_path: str | None = None
    kitti_path: str | None = None
    hd1k_path: str | None = None

    def __post_init__(self):
        if self.source not in FLOW_SOURCES:
            raise ValueError(f"data.source={self.source!r}: a flow run reads one of {FLOW_SOURCES}")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path: {LAYOUTS[layout_name(self.source)]}")
        for name in ("frame_size", "crop_size"):
            size = getattr(self, name)
            if len(size) != 2 or any(s < 64 or s % 8 for s in size):
                raise ValueError(f"data.{name}={size}: (H, W), multiples of 8 and at least 64 (RAFT's pyramid)")
        if self.iters < 1:
            raise ValueError(f"data.iters must be >= 1, got {self.iters}")
        if self.sintel_mix not in SINTEL_MIXES:
            raise ValueError(f"data.sintel_mix={self.sintel_mix!r}: expected one of {tuple(SINTEL_MIXES)}")
        if self.sintel_mix != "sintel":
            if self.source != "sintel" or not self.augment:
                raise ValueError(
                    f"data.sintel_mix={self.sintel_mix!r} is RAFT's sintel stage: it needs "
                    "data.source=sintel and data.augment=true"
                )
            missing = [
                f"data.{name}_path"
                for name in SINTEL_MIXES[self.sintel_mix]
                if name != "sintel" and not getattr(self, f"{name}_path")
            ]
            if missing:
                raise ValueError(
                    f"data.sintel_mix={self.sintel_mix!r} also reads {', '.join(missing)}: set "
                    + ", ".join(f"{m}=ROOT" for m in missing)
                )
        if not 0 < self.loss_gamma <= 1:
            raise ValueError(f"data.loss_gamma={self.loss_gamma}: expected in (0, 1] (RAFT: 0.8, or 0.85 fine-tuning)")
        if not set(self.passes) <= {"clean", "final"} or not self.passes:
            raise ValueError(f"data.passes={self.passes}: one or both of ('clean', 'final')")


def layout_name(source: str) -> str:
    return "folder" if source == "synthetic" else source


@dataclasses.dataclass(frozen=True)
class Subset:
    source: object
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[self.indices[index]]


@dataclasses.dataclass(frozen=True)
class Concat:
    parts: tuple[object, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, index: int):
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


def _hold_out(passes: Sequence[object], count: int, what: str) -> tuple[object, object]:
    """(train, held-out) over the same pair indices of every pass."""
    total = len(passes[0])
    if count >= total:
        raise ValueError(f"data.validation_size={count} leaves no training pairs: {what} has {total}")
    order = np.random.default_rng(_HOLDOUT_SEED).permutation(total)
    held, kept = tuple(sorted(order[:count].tolist())), tuple(sorted(order[count:].tolist()))
    train = Concat(tuple(Subset(p, kept) for p in passes))
    return train, (Concat(tuple(Subset(p, held) for p in passes)) if count else None)


def _open(source: str, root: str, **options):
    """The dataset, or a ValueError naming the folder and the layout expected there."""
    if not Path(root).exists():
        raise ValueError(f"{source} dataset not found at {root}. Expected layout: {LAYOUTS[layout_name(source)]}")
    return open_flow_dataset(source, root, **options)


def flow_splits(config: FlowDataConfig) -> dict[str, object]:
    """{"train", "validation" (absent when validation_size=0), "test"} random-access sources."""
    held = config.validation_size
    if config.source == "synthetic":
        height, width = config.frame_size
        base = 3 * config.synthetic_seed

        def make(size, offset):
            return SyntheticFlow(size, height=height, width=width, seed=base + offset)

        splits = {"train": make(config.synthetic_train_size, 0), "test": make(config.synthetic_test_size, 2)}
        if held:
            splits["validation"] = make(held, 1)
        return splits
    if config.source == "chairs":
        train, validation = _hold_out([_open("chairs", config.path, split="training")], held, "chairs training")
        test = _open("chairs", config.path, split="validation")
    elif config.source == "things":
        passes = [_open("things", config.path, pass_name=p, split="TRAIN") for p in config.passes]
        train, validation = _hold_out(passes, held, "things TRAIN")
        test = _open("things", config.path, pass_name=config.passes[0], split="TEST")
    elif config.source == "sintel":
        passes = [_open("sintel", config.path, split="training", pass_name=p) for p in config.passes]
        train, validation = _hold_out(passes, held, "sintel training")
        test = validation
        if config.sintel_mix != "sintel":
            train = sintel_mixture(config, train)
    else:  # kitti, folder
        options = {"split": "training"} if config.source == "kitti" else {}
        train, validation = _hold_out([_open(config.source, config.path, **options)], held, config.source)
        test = validation
    if test is None:
        raise ValueError(f"data.source={config.source!r} tests on held-out pairs: set data.validation_size > 0")
    return {"train": train, "test": test, **({"validation": validation} if validation is not None else {})}


def sintel_mixture(config: FlowDataConfig, sintel_train: Concat) -> FlowMixture:
    """RAFT's sintel stage: ``100*sintel_clean + 100*sintel_final [+ 200*kitti + 5*hd1k] + things`` (its
    order), each pass of Sintel's training pairs (less the held-out ones) 100 times, with RAFT's per-dataset
    augmentation: Sintel and Things (clean pass) with the sintel stage's (scale -0.2..0.6), KITTI
    -0.3..0.5 with flips, HD1K -0.5..0.2 (both sparse)."""
    crop = config.crop_size
    sintel_augment = raft_augment_config("sintel", crop)
    parts = [
        MixturePart(f"sintel_{name}", source, 100, sintel_augment)
        for name, source in zip(config.passes, sintel_train.parts)
    ]
    if "kitti" in SINTEL_MIXES[config.sintel_mix]:
        kitti_augment = dataclasses.replace(
            raft_augment_config("kitti", crop), min_scale=-0.3, max_scale=0.5, do_flip=True
        )
        parts += [
            MixturePart("kitti", _open("kitti", config.kitti_path, split="training"), 200, kitti_augment),
            MixturePart("hd1k", _open("hd1k", config.hd1k_path), 5, raft_augment_config("hd1k", crop)),
        ]
    things = _open("things", config.things_path, pass_name="clean", split="TRAIN")
    return FlowMixture((*parts, MixturePart("things_clean", things, 1, sintel_augment)))


def train_augmentation(config: FlowDataConfig) -> AugmentConfig | None:
    """RAFT's preset for the source (crop = ``crop_size``); synthetic frames get the Chairs preset with an
    eraser scaled to the crop (RAFT's 50-100 px boxes would blank a 64 px frame)."""
    if not config.augment:
        return None
    preset = config.augment_preset or ("chairs" if config.source in ("synthetic", "folder") else config.source)
    augment = raft_augment_config(preset, config.crop_size)
    if config.source == "synthetic" and config.augment_preset is None:
        side = min(config.crop_size)
        augment = dataclasses.replace(augment, eraser_size=(max(1, side // 8), max(2, side // 4)))
    return augment


class FlowDatasets:
    """A ``Datasets`` of flow pairs: ``train`` (resumable), ``eval_batches(split)`` (padded to multiples
    of 8, ``mask`` / ``valid`` 0 on padding), split sizes, plus ``iters`` and the training frame shape."""

    def __init__(
        self,
        config: FlowDataConfig,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        layout = ProcessSlice.of(global_batch_size, process_index, process_count)
        self.config = config
        self._splits = flow_splits(config)
        self._layout = dataclasses.asdict(layout)
        augment = train_augmentation(config)
        self.train = make_flow_train_iterator(self._splits["train"], augment, seed=seed, **self._layout)
        self.num_train = len(self._splits["train"])
        self.num_validation = len(self._splits.get("validation", ()))
        self.num_test = len(self._splits["test"])
        self.iters = config.iters
        self.pad_mode = "kitti" if config.source == "kitti" else "sintel"
        if augment is not None:
            self.frame_shape = tuple(config.crop_size)
        elif config.source == "synthetic":
            self.frame_shape = tuple(config.frame_size)
        else:
            self.frame_shape = self._splits["train"][0]["image1"].shape[:2]

    def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
        if split not in self._splits:
            raise ValueError(f"no {split!r} split in this flow data (validation_size=0?)")
        return flow_eval_batches(self._splits[split], pad_mode=self.pad_mode, **self._layout)

    def describe(self) -> str:
        source = self.config.source + ("" if self.config.source == "synthetic" else f" at {self.config.path}")
        if isinstance(self._splits["train"], FlowMixture):
            source += f" (RAFT's {self.config.sintel_mix} mixture: {self._splits['train'].describe()})"
        return (
            f"{source}, {self.frame_shape[0]}x{self.frame_shape[1]} training frames, {self.iters} iterations: "
            f"{self.num_train} train / {self.num_validation} validation / {self.num_test} test pairs"
        )
