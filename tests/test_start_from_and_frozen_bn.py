"""``init_ckpt`` (start the trained network from an exported one: RAFT's chairs -> things -> sintel chain)
and ``train.freeze_batch_norm`` (RAFT's freeze_bn), on the toy per-pixel task."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hkt_jax.training import checkpoint
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run
from hkt_jax.training.run import build_run, compile_steps, initial_state


def _config(*overrides):
    return apply_overrides(load_config("toy_segmentation"), ["method=child", "train.steps=2", *overrides])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("first_stage")
    run(_config(), workdir)
    return workdir / "export" / "child"


def _one_step(run_):
    state = initial_state(run_.init_variables, run_.tx)
    before = jax.device_get(state)
    train_step, _ = compile_steps(
        task=run_.task,
        model=run_.model,
        loss_fn=run_.loss_fn,
        tx=run_.tx,
        schedule=run_.schedule,
        parent_variables=run_.parent_variables,
        mesh=run_.mesh,
        state=state,
    )
    batch = next(run_.datasets.train)
    after, _ = train_step(state, run_.parent_variables, batch)
    return before, jax.device_get(after)


@pytest.mark.parametrize("method", ["child", "hkt"])
def test_training_starts_from_the_exported_network(exported, method):
    variables, _ = checkpoint.load_model(exported)
    overrides = [f"method={method}", f"init_ckpt={exported}"]
    if method == "hkt":  # the exported child as its own parent: only the shapes matter here
        overrides += [f"parent_ckpt={exported}", "parent.widths=4,8"]
    started = build_run(_config(*overrides)).init_variables
    for mine, theirs in zip(jax.tree.leaves(started["params"]["child"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(mine), theirs)
    stats = jax.tree.leaves(started["batch_stats"]["child"])
    assert stats and all(np.array_equal(a, b) for a, b in zip(stats, jax.tree.leaves(variables["batch_stats"])))
    fresh = build_run(_config(*overrides[:1] + overrides[2:])).init_variables
    assert not np.array_equal(jax.tree.leaves(fresh["params"]["child"])[0], jax.tree.leaves(variables["params"])[0])


def test_a_different_network_in_init_ckpt_is_an_error_naming_both(exported, tmp_path):
    with pytest.raises(ValueError, match=r"init_ckpt=.*holds toy .*4, 8.*trains toy .*16, 32"):
        build_run(_config(f"init_ckpt={exported}", "child.widths=16,32"))
    with pytest.raises(ValueError, match=r"init_ckpt=.*not a model checkpoint"):
        build_run(_config(f"init_ckpt={tmp_path}"))


def test_a_missing_init_ckpt_stops_the_job_before_anything_is_written(tmp_path):
    from hkt_jax.training.faults import UserError

    with pytest.raises(UserError, match="init_ckpt='/nowhere/export/child': no such directory"):
        run(_config("init_ckpt=/nowhere/export/child"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frozen_batch_norm_keeps_running_statistics_and_still_trains():
    before, after = _one_step(build_run(_config("train.freeze_batch_norm=true")))
    for a, b in zip(jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))
    before, after = _one_step(build_run(_config()))  # not frozen: the statistics move
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats))
    )
