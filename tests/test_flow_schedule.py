"""The flow configs follow RAFT's ``train_standard.sh`` and ``core/datasets.py`` where they say so: chairs
-> things -> sintel -> kitti, each stage starting from the previous one's export, chairs at batch 12, gamma
0.85 in the fine-tuning stages (reaching the task's sequence loss), the sintel stage's mixtures with
RAFT's proportions and per-dataset augmentation, and the paper's MAE option for L1/L3 trains."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import threading
from collections import Counter

from hkt_jax.training import factories
from hkt_jax.training.config import HKTSettings, apply_overrides, load_config
from hkt_jax.data.flow_io import write_flo, write_image, write_kitti_flow, write_pfm
from hkt_jax.data.flow_pipeline import FlowMixture, MixturePart, make_flow_train_iterator
from hkt_jax.tasks.flow_metrics import sequence_loss
from hkt_jax.models import RAFT
from hkt_jax.tasks import Flow, make_task
from hkt_jax.tasks.flow_data import FlowDataConfig, FlowDatasets

# RAFT train_standard.sh: (batch, lr, weight decay, steps, crop, gamma, restored from)
RAFT_STANDARD = {
    "flow_chairs": (12, 4e-4, 1e-4, 100_000, (368, 496), 0.8, None),
    "flow_things": (6, 1.25e-4, 1e-4, 100_000, (400, 720), 0.8, "flow_chairs"),
    "flow_sintel": (6, 1.25e-4, 1e-5, 100_000, (368, 768), 0.85, "flow_things"),
    "flow_kitti": (6, 1e-4, 1e-5, 50_000, (288, 960), 0.85, "flow_sintel"),
}


@pytest.mark.parametrize("name", sorted(RAFT_STANDARD))
def test_each_stage_copies_raft_and_starts_from_the_previous_one(name):
    batch, lr, decay, steps, crop, gamma, previous = RAFT_STANDARD[name]
    config = load_config(name)
    assert (
        config.train.batch_size,
        config.optim.learning_rate,
        config.optim.weight_decay,
        config.train.steps,
        tuple(config.data.crop_size),
    ) == (batch, lr, decay, steps, crop)
    assert (config.optim.optimizer, config.optim.schedule, config.optim.clip_norm) == ("adamw", "one_cycle", 1.0)
    task = make_task(config.task, config)
    assert task.gamma == gamma
    if previous is None:
        assert config.init_ckpt is None
    else:
        assert config.init_ckpt == f"workdirs/{previous}/export/child"
        assert config.train.freeze_batch_norm


def test_gamma_reaches_the_sequence_loss_and_is_validated():
    config = apply_overrides(load_config("flow_smoke"), ["data.loss_gamma=0.5"])
    task = make_task("flow", config)
    rng = np.random.default_rng(0)
    outputs = jnp.asarray(rng.normal(size=(3, 1, 8, 8, 2)), jnp.float32)
    batch = {"flow": jnp.zeros((1, 8, 8, 2)), "valid": jnp.ones((1, 8, 8))}
    errors = np.abs(np.asarray(outputs)).mean(axis=(1, 2, 3, 4))
    assert float(task.task_loss(outputs, batch)) == pytest.approx(
        0.25 * errors[0] + 0.5 * errors[1] + errors[2], rel=1e-5
    )
    assert float(task.task_loss(outputs, batch)) == pytest.approx(
        float(sequence_loss(outputs, batch["flow"], batch["valid"], gamma=0.5)), rel=1e-6
    )
    with pytest.raises(ValueError, match="data.loss_gamma"):
        apply_overrides(load_config("flow_smoke"), ["data.loss_gamma=1.5"])


FRAME = (40, 48)  # small frames: RAFT's augmentation scales them up to the 64x64 crops


def _frames(rng, *paths):
    for path in paths:
        write_image(path, rng.integers(0, 255, FRAME + (3,), dtype=np.uint8))


def _flow(rng):
    """A constant motion per pair: something a network learns within a few steps."""
    return np.broadcast_to(rng.uniform(-3, 3, 2), FRAME + (2,)).astype(np.float32)


def write_raft_datasets(root, rng):
    """Tiny Sintel (3 frames = 2 pairs per pass), Things (2 pairs x 2 directions), KITTI (2) and HD1K (2 x 2)."""
    for dstype in ("clean", "final"):
        _frames(rng, *(root / "Sintel" / "training" / dstype / "alley_1" / f"frame_{i:04d}.png" for i in (1, 2, 3)))
    for i in (1, 2):
        write_flo(root / "Sintel" / "training" / "flow" / "alley_1" / f"frame_{i:04d}.flo", _flow(rng))
    things = root / "FlyingThings3D"
    _frames(rng, *(things / "frames_cleanpass" / "TRAIN" / "A" / "0000" / "left" / f"{n:04d}.png" for n in (6, 7, 8)))
    for n in (6, 7, 8):
        for direction, word in (("into_future", "Future"), ("into_past", "Past")):
            write_pfm(
                things
                / "optical_flow"
                / "TRAIN"
                / "A"
                / "0000"
                / direction
                / "left"
                / f"OpticalFlowInto{word}_{n:04d}_L.pfm",
                np.concatenate([_flow(rng), np.zeros(FRAME + (1,))], -1),
            )
    valid = rng.uniform(size=FRAME) > 0.5
    for i in range(2):
        _frames(
            rng,
            root / "KITTI" / "training" / "image_2" / f"{i:06d}_10.png",
            root / "KITTI" / "training" / "image_2" / f"{i:06d}_11.png",
        )
        write_kitti_flow(root / "KITTI" / "training" / "flow_occ" / f"{i:06d}_10.png", _flow(rng), valid)
        for j in range(3):
            _frames(rng, root / "HD1K" / "hd1k_input" / "image_2" / f"{i:06d}_{j:04d}.png")
            write_kitti_flow(root / "HD1K" / "hd1k_flow_gt" / "flow_occ" / f"{i:06d}_{j:04d}.png", _flow(rng), valid)


class Counting:
    """A flow source that counts how often it is read (grain reads from several threads)."""

    def __init__(self, source, counts, name):
        self.source, self.counts, self.name, self.lock = source, counts, name, threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        with self.lock:
            self.counts[self.name] += 1
        return self.source[index]


def test_sintel_stage_mixtures_have_rafts_proportions_and_augmentation(tmp_path):
    write_raft_datasets(tmp_path, np.random.default_rng(0))
    config = FlowDataConfig(
        source="sintel",
        path=str(tmp_path / "Sintel"),
        crop_size=(64, 64),
        validation_size=1,
        sintel_mix="C+T+S+K+H",
        things_path=str(tmp_path / "FlyingThings3D"),
        kitti_path=str(tmp_path / "KITTI"),
        hd1k_path=str(tmp_path / "HD1K"),
        iters=1,
    )
    datasets = FlowDatasets(config, global_batch_size=8, seed=0)
    mixture = datasets._splits["train"]
    # One Sintel pair per pass is left after holding one out; Things has 2 pairs x 2 directions.
    assert [(p.name, p.times, len(p.source)) for p in mixture.parts] == [
        ("sintel_clean", 100, 1),
        ("sintel_final", 100, 1),
        ("kitti", 200, 2),
        ("hd1k", 5, 4),
        ("things_clean", 1, 4),
    ]
    augment = {p.name: p.augment for p in mixture.parts}
    assert (augment["kitti"].min_scale, augment["kitti"].max_scale, augment["kitti"].do_flip) == (-0.3, 0.5, True)
    assert augment["kitti"].sparse and augment["hd1k"].sparse and not augment["things_clean"].sparse
    assert (augment["hd1k"].min_scale, augment["hd1k"].max_scale) == (-0.5, 0.2)
    assert augment["sintel_clean"] == augment["things_clean"] and augment["sintel_clean"].max_scale == 0.6
    assert "C+T+S+K+H" in datasets.describe() and datasets.num_validation == 2
    batch = next(datasets.train)
    assert batch["image1"].shape == (8, 64, 64, 3) and np.isfinite(batch["flow"]).all()

    # One epoch of the stream reads every part exactly as often as RAFT's multiplied lists hold it.
    counts = Counter()
    counted = FlowMixture(
        tuple(MixturePart(p.name, Counting(p.source, counts, p.name), p.times, p.augment) for p in mixture.parts)
    )
    # No read-ahead: grain would otherwise read the first samples of the next epoch already.
    stream = make_flow_train_iterator(counted, None, global_batch_size=8, seed=3, num_threads=0, prefetch_batches=0)
    for _ in range(len(counted) // 8):
        next(stream)
    assert len(counted) == 624
    assert dict(counts) == {"sintel_clean": 100, "sintel_final": 100, "kitti": 400, "hd1k": 20, "things_clean": 4}

    with pytest.raises(ValueError, match="also reads data.kitti_path, data.hd1k_path"):
        FlowDataConfig(source="sintel", path="x", sintel_mix="C+T+S+K+H", things_path="t")
    with pytest.raises(ValueError, match="needs data.source=sintel"):
        FlowDataConfig(source="things", path="x", sintel_mix="C+T+K/S", things_path="t")
    small = dataclasses.replace(config, sintel_mix="C+T+K/S")
    assert [p.name for p in FlowDatasets(small, global_batch_size=8, seed=0)._splits["train"].parts] == [
        "sintel_clean",
        "sintel_final",
        "things_clean",
    ]


def test_hkt_with_the_papers_mae_for_l1_l3_trains(tmp_path):
    """hkt.inherit_loss=mae (the paper's Eq. 5/8 on the final flow), on a batch of the sintel stage's mixture:
    a few Adam steps lower the objective and every term stays finite."""
    task = Flow(max_flow=400.0)
    write_raft_datasets(tmp_path, np.random.default_rng(1))
    config = FlowDataConfig(
        source="sintel",
        path=str(tmp_path / "Sintel"),
        crop_size=(64, 64),
        validation_size=1,
        sintel_mix="C+T+K/S",
        things_path=str(tmp_path / "FlyingThings3D"),
        iters=1,
    )
    batch = {k: jnp.asarray(v) for k, v in next(FlowDatasets(config, global_batch_size=2, seed=0).train).items()}
    child, parent = RAFT(small=True, iters=1), RAFT(small=True, iters=1)
    example = task.model_input(batch)
    parent_vars = factories.jit_init(functools.partial(parent.init, train=False))(jax.random.key(1), example)
    loss_fn, variables = factories.make_method(
        "hkt",
        child,
        task,
        example,
        jax.random.key(0),
        parent=parent,
        parent_variables=parent_vars,
        hkt=HKTSettings(inherit_loss="mae", stages=3),
    )
    tx = optax.adam(5e-4)
    params, stats = variables["params"], variables.get("batch_stats", {})
    opt_state = jax.jit(tx.init)(params)  # one program, not one per leaf shape

    @jax.jit
    def step(params, opt_state):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, parent_vars, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux["metrics"]

    losses = []
    for _ in range(8):
        params, opt_state, loss, metrics = step(params, opt_state)
        losses.append(float(loss))
        assert all(np.isfinite(float(metrics[k])) for k in ("l1", "l2", "l3"))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses


def test_start_up_names_the_hkt_settings_and_the_sequence_loss_deviation():
    from hkt_jax.training import hooks

    config = load_config("flow_smoke")
    (note,) = make_task("flow", config).startup_notes(config)
    assert "sequence loss" in note and "hkt.inherit_loss=mae" in note
    mae = apply_overrides(config, ["hkt.inherit_loss=mae"])
    assert make_task("flow", mae).startup_notes(mae) == []
    line = hooks.hkt_line(apply_overrides(config, ["hkt.lam=0.5", "hkt.child_taps=a,b"]).hkt)
    assert "lambda=0.5" in line and "alphas=(0.25, 0.5, 0.25)" in line and "L1/L3=seq" in line
    assert "GA mode=auto" in line and "taps child a,b" in line
