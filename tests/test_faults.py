"""Faults injected into real runs: signals, a blown-up learning rate, damaged checkpoints, failed saves, a
changed config. Each run is the toy per-pixel task (seconds on a CPU) through the one loop, called as the
entry point is (``experiments.cifar_hkt.main``); the reference nobody here wrote is the uninterrupted run.
Bad inputs at start-up are in ``test_faults_input.py``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import cifar_hkt
from hkt_jax.training import checkpoint, faults, hooks, sharding, stopping
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.run import build_run, initial_state
from tests.conftest import REPO_ROOT

TOY = ["--config", "toy_segmentation", "method=child"]  # 16 steps; log every 4, eval + checkpoint every 8


def _main(workdir, *overrides) -> int:
    return cifar_hkt.main([*TOY, "--workdir", str(workdir), *overrides])


def _rows(workdir):
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_result(workdir, reference):
    resumed, _ = checkpoint.load_model(Path(workdir) / "export" / "child")
    straight, _ = checkpoint.load_model(Path(reference) / "export" / "child")
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    assert _rows(workdir) == _rows(reference)


def _at_step(monkeypatch, step, action):
    """Run ``action()`` inside the loop once ``step`` steps are done (from a hook, like a real signal)."""
    original = hooks.Progress.__call__

    def call(self, done, state, metrics):
        if done == step:
            action()
        return original(self, done, state, metrics)

    monkeypatch.setattr(hooks.Progress, "__call__", call)


GUARD_READS = "guard_reads.json"  # beside the uninterrupted run: after which steps the non-finite flags were read


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    reads = []
    original = stopping.NonFiniteGuard.check_recorded

    def check_recorded(self, latest_checkpoint):
        if self.recorded:
            reads.append([done for done, _ in self.recorded])
        return original(self, latest_checkpoint)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stopping.NonFiniteGuard, "check_recorded", check_recorded)
        assert _main(workdir) == 0
    (workdir / GUARD_READS).write_text(json.dumps(reads))
    return workdir


def test_the_loop_reads_the_device_only_where_it_fetches_anyway(uninterrupted):
    """The non-finite flags stay on the device between the fetches of the logging window (every 4 steps
    here; evaluation and checkpoints every 8 coincide): no per-step wait for the device."""
    reads = json.loads((uninterrupted / GUARD_READS).read_text())
    assert reads == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]


def _abstract_state(overrides=("method=child",)):
    run = build_run(apply_overrides(load_config("toy_segmentation"), list(overrides)))
    state = initial_state(run.init_variables, run.tx)
    shardings = sharding.state_shardings(state, run.mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# -- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signum, step",
    [(signal.SIGTERM, 3), (signal.SIGINT, 10)],
    ids=["sigterm_before_first_ckpt", "sigint_after_first_ckpt"],
)
def test_signal_saves_the_current_step_and_rerun_is_bit_identical(
    uninterrupted, tmp_path, monkeypatch, capsys, signum, step
):
    workdir = tmp_path / "run"
    sent = {}

    def send():
        sent["time"] = time.perf_counter()
        os.kill(os.getpid(), signum)

    _at_step(monkeypatch, step, send)
    code = _main(workdir)
    stopped_after = time.perf_counter() - sent["time"]
    err = capsys.readouterr().err
    assert code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} at step {step} of 16" in err and "Traceback" not in err
    assert _steps(workdir)[-1] == step  # a checkpoint of exactly the step it was in (mid log window)
    assert stopped_after < 30, stopped_after
    assert not (workdir / "summary.json").exists()
    monkeypatch.undo()

    # The rerun says where it resumes; time-based checkpoints (a safe config change) do not change the result.
    assert _main(workdir, "train.checkpoint_every_minutes=1e-9") == 0
    out = capsys.readouterr().out
    assert f"resuming from step {step} of 16" in out
    _assert_same_result(workdir, uninterrupted)
    # Every step was saved by time; the two newest are kept, and 15 was not due by steps (every 8).
    assert _steps(workdir) == [15, 16]


def _run_toy_process(workdir, *overrides, stdout=None, stderr=subprocess.PIPE, slow_saves=False):
    """The entry point in its own process; ``slow_saves`` makes every checkpoint save wait a minute first."""
    entry = ["-m", "experiments.cifar_hkt"]
    if slow_saves:
        entry = [
            "-c",
            "import sys, time; import hkt_jax.training.checkpoint as c; save = c.save_training; "
            "c.save_training = lambda *a, **k: (time.sleep(60), save(*a, **k))[1]; "
            "from experiments.cifar_hkt import main; sys.exit(main())",
        ]
    cmd = [sys.executable, *entry, *TOY, "--workdir", str(workdir), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr, text=True)


def _wait_for(condition, process, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _logged_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_real_process_sigterm_then_double_ctrl_c(tmp_path):
    """A separate process: exit code, no traceback, prompt exit; the rerun resumes; a second Ctrl-C does not
    wait for the save the first one asked for (saves are made to take a minute here)."""
    workdir = tmp_path / "run"
    long = ["train.steps=100000", "train.log_every_steps=1"]
    process = _run_toy_process(workdir, *long)
    _wait_for(lambda: _logged_steps(workdir), process, "the first logged step")
    process.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    _, err = process.communicate(timeout=120)
    assert process.returncode == faults.EXIT_SIGTERM, err[-2000:]
    assert time.perf_counter() - sent < 30
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and "Rerun the same command" in last
    stopped_at = int(last.split("at step ")[1].split()[0])
    assert _steps(workdir)[-1] == stopped_at

    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err_file:
        process = _run_toy_process(workdir, *long, stdout=out, stderr=err_file, slow_saves=True)
        _wait_for(
            lambda: _logged_steps(workdir) and _logged_steps(workdir)[-1] > stopped_at,
            process,
            "a step after the resume",
        )
        process.send_signal(signal.SIGINT)
        _wait_for(
            lambda: "SIGINT: stopping after the current step" in (tmp_path / "err.txt").read_text(),
            process,
            "the first Ctrl-C's message",
        )
        process.send_signal(signal.SIGINT)
        sent = time.perf_counter()
        process.wait(timeout=30)
    assert time.perf_counter() - sent < 10
    assert f"resuming from step {stopped_at} of 100000" in (tmp_path / "out.txt").read_text()
    assert process.returncode == -signal.SIGINT  # the shell shows 130
    assert "Traceback" not in (tmp_path / "err.txt").read_text()
    assert _steps(workdir)[-1] == stopped_at  # the interrupted save left nothing half-made behind


# -- non-finite loss ----------------------------------------------------------------------------


def test_blown_up_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, library_default_prng):
    workdir = tmp_path / "run"
    # The learning rate warms up to 1e5 over the 16 steps: sane at first, the gradients overflow at step 4.
    warmup = ["optim.schedule=cosine", "optim.warmup_epochs=1", "train.checkpoint_every_steps=2"]
    assert _main(workdir, "optim.learning_rate=1e5", *warmup) == faults.EXIT_NONFINITE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 4 of 16: non-finite gradient norm: training stopped")
    assert "latest checkpoint (step 2" in err[-1] and "Traceback" not in "\n".join(err)
    assert _steps(workdir) == [2]  # nothing of the bad step was saved
    restored = checkpoint.restore_latest_readable(checkpoint.training_manager(workdir), _abstract_state())
    assert restored.step == 2 and not restored.skipped
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))
    assert all(step <= 2 for step in _logged_steps(workdir))

    # A saner learning rate is a config change: refused, naming the key, unless allowed.
    assert _main(workdir, "optim.learning_rate=0.05", *warmup) == faults.EXIT_USAGE
    refused = capsys.readouterr().err.strip()
    assert refused.count("\n") == 0 and "--allow_config_change" in refused
    assert "optim.learning_rate: 100000.0 -> 0.05" in refused and "optim.schedule" not in refused
    # A safe key alone (how often to save) is no reason to refuse.
    assert _main(workdir, "optim.learning_rate=0.05", *warmup, "--allow_config_change") == 0
    assert "resuming from step 2 of 16" in capsys.readouterr().out
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 16


def test_nonfinite_step_found_at_a_later_fetch_is_named_and_never_saved(tmp_path, capsys, library_default_prng):
    """The flags are read only at the next fetch (step 6, a checkpoint): the error still names the first bad
    step (4), and the checkpoint due at step 6 is not written."""
    workdir = tmp_path / "run"
    schedule = [
        "optim.schedule=cosine",
        "optim.warmup_epochs=1",
        "train.checkpoint_every_steps=3",
        "train.log_every_steps=8",
    ]
    assert _main(workdir, "optim.learning_rate=1e5", *schedule) == faults.EXIT_NONFINITE
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 4 of 16: non-finite gradient norm: training stopped")
    assert "latest checkpoint (step 3" in err[-1]
    assert _steps(workdir) == [3] and _logged_steps(workdir) == []


def test_skip_nonfinite_steps_keeps_the_old_state_and_counts(tmp_path, capsys, library_default_prng):
    """With a budget of skipped steps the blown-up run never saves non-finite parameters; it stops when the
    budget is used up in a row."""
    workdir = tmp_path / "run"
    assert (
        _main(workdir, "optim.learning_rate=1e6", "train.skip_nonfinite_steps=2", "train.log_every_steps=1")
        == faults.EXIT_NONFINITE
    )
    err = capsys.readouterr().err
    assert "step 3: non-finite" in err and "update skipped (1 in a row" in err and "(2 in a row" in err
    assert "error: step 5 of 16: non-finite" in err and "after 3 in a row" in err
    rows = {r["step"]: r for r in _rows(workdir) if "loss" in r}
    assert rows[3]["skipped_steps"] == 1 and rows[4]["skipped_steps"] == 1 and rows[2]["skipped_steps"] == 0


def test_train_step_names_the_nonfinite_term_and_keeps_the_old_state_when_skipping():
    import jax.numpy as jnp
    import optax

    from hkt_jax.training.stopping import describe_bits
    from hkt_jax.training.run import TrainState, make_train_step

    def loss_fn(params, batch_stats, parent_variables, batch):  # L3 goes NaN when the batch says so
        l2 = jnp.sum((params["w"] - batch["x"]) ** 2)
        l3 = jnp.where(batch["poison"], jnp.nan, 0.0) * params["w"].sum()
        return l2 + l3, {
            "metrics": {"loss": l2 + l3, "l1": 0.0 * l2, "l2": l2, "l3": l3},
            "batch_stats": batch_stats,
            "outputs": None,
        }

    tx = optax.sgd(0.1, momentum=0.9)
    params = {"w": jnp.ones(3)}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params))
    step = jax.jit(make_train_step(loss_fn, tx, optax.constant_schedule(0.1), skip_nonfinite=True))
    good = {"x": jnp.zeros(3), "poison": False}
    state, metrics = step(state, {}, good)
    assert int(metrics["nonfinite"]) == 0 and int(metrics["skipped_steps"]) == 0
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = step(state, {}, {**good, "poison": True})
    assert describe_bits(int(metrics["nonfinite"])) == (
        "total loss, L3 (head inheritance loss), gradient norm, parameters after the update"
    )
    assert int(metrics["skipped_steps"]) == 1 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state), before)
    state, metrics = step(state, {}, good)
    assert int(metrics["nonfinite"]) == 0 and not np.array_equal(np.asarray(state.params["w"]), before[0]["w"])


# -- damaged checkpoints, failed saves ----------------------------------------------------------


def test_every_file_of_the_newest_checkpoint_deleted_or_truncated(uninterrupted, tmp_path):
    """Restore either reads step 16 correctly (the file was not needed) or warns and falls back to 8."""
    abstract = _abstract_state()
    good = checkpoint.restore_latest_readable(checkpoint.training_manager(uninterrupted), abstract)
    assert good.step == 16
    files = sorted(
        p.relative_to(uninterrupted) for p in (uninterrupted / "checkpoints" / "16").rglob("*") if p.is_file()
    )
    assert len(files) >= 10
    fell_back = 0
    for damage in ("delete", "truncate"):
        for relative in files:
            copy = tmp_path / f"{damage}-{len(list(tmp_path.iterdir()))}"
            shutil.copytree(uninterrupted / "checkpoints", copy / "checkpoints")
            target = copy / relative
            if damage == "delete":
                target.unlink()
            else:
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            manager = checkpoint.training_manager(copy)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                restored = checkpoint.restore_latest_readable(manager, abstract)
            manager.close()
            if restored.step == 16:
                jax.tree.map(np.testing.assert_array_equal, restored.state, good.state)
                assert restored.data == good.data and restored.loop == good.loop
                continue
            fell_back += 1
            assert restored.step == 8 and restored.skipped[0].startswith("step 16 (")
            assert any("unreadable newer checkpoint(s) step 16" in str(w.message) for w in caught)
            assert (copy / "checkpoints_unreadable" / "16").is_dir() and not (copy / "checkpoints" / "16").exists()
    assert fell_back >= 6


def _not_progress(err: str) -> list[str]:
    """stderr's lines without the tqdm bar's (``child: 50%|...``, redrawn after carriage returns)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("child:")]


def test_truncated_newest_checkpoint_falls_back_and_ends_bit_identical(uninterrupted, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    _at_step(monkeypatch, 12, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert _main(workdir) == faults.EXIT_SIGINT
    monkeypatch.undo()
    capsys.readouterr()
    assert _steps(workdir) == [8, 12]
    biggest = max(
        (p for p in (workdir / "checkpoints" / "12" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    biggest.write_bytes(biggest.read_bytes()[:10])
    # As a user reruns it, in its own process: the recovery says one warning, not pages of orbax tracebacks.
    with open(tmp_path / "out.txt", "w") as out:
        process = _run_toy_process(workdir, stdout=out)
        _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "resuming from step 8 of 16" in (tmp_path / "out.txt").read_text()
    lines = _not_progress(err)
    assert 1 <= len(lines) <= 2, err[-3000:]  # the warning (and the line warnings shows its source from)
    assert "unreadable newer checkpoint(s) step 12 (" in lines[0] and "resuming from step 8" in lines[0]
    assert (workdir / "checkpoints_unreadable" / "12").is_dir()
    _assert_same_result(workdir, uninterrupted)

    # No readable checkpoint at all: one clear line, not an orbax traceback.
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "state" / "_METADATA").unlink()
    assert _main(workdir) == faults.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no readable checkpoint in ") and "step 16 (" in err[0]


def test_model_export_is_all_or_nothing(tmp_path, monkeypatch):
    """A process killed while it exports leaves the previous model whole: the new one is written beside it
    and swapped in by renames; a swap cut off between its two renames is put back by ``recover_model``."""
    target = tmp_path / "best"
    old = {"params": {"w": np.zeros(3, np.float32)}, "batch_stats": {}}
    new = {"params": {"w": np.ones(3, np.float32)}, "batch_stats": {}}
    checkpoint.save_model(target, old, {"name": "old"})
    original, renames = Path.rename, []

    def dies_at_second_rename(self, destination):
        renames.append(Path(destination).name)
        if len(renames) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, destination)

    monkeypatch.setattr(Path, "rename", dies_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_model(target, new, {"name": "new"})
    monkeypatch.undo()
    assert renames == [".best.previous", "best"] and not target.exists()
    assert checkpoint.recover_model(target)
    variables, spec = checkpoint.load_model(target)
    assert spec == {"name": "old"}
    np.testing.assert_array_equal(variables["params"]["w"], old["params"]["w"])

    # The next export replaces the stale half-made copy and the model, and leaves nothing else behind.
    checkpoint.save_model(target, new, {"name": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    variables, spec = checkpoint.load_model(target)
    assert spec == {"name": "new"}
    np.testing.assert_array_equal(variables["params"]["w"], new["params"]["w"])


def test_half_written_models_are_set_aside_and_never_overwritten(tmp_path):
    target = tmp_path / "best"
    for written in ("first", "second"):
        (target / checkpoint.VARIABLES_ITEM).mkdir(parents=True)
        (target / checkpoint.VARIABLES_ITEM / "marker").write_text(written)
        with pytest.warns(UserWarning, match="half-written"):
            assert not checkpoint.recover_model(target)
    assert not target.exists()
    assert [
        (tmp_path / name / checkpoint.VARIABLES_ITEM / "marker").read_text()
        for name in ("best.unreadable", "best.unreadable.1")
    ] == ["first", "second"]


def test_half_written_best_is_set_aside_and_the_run_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    """``best/`` without ``model.json`` (a run killed mid-export by a version that wrote in place) is moved
    aside with one warning; the resumed run ends as the uninterrupted one (as CI once saw it fail)."""
    workdir = tmp_path / "run"
    _at_step(monkeypatch, 12, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert _main(workdir) == faults.EXIT_SIGINT
    monkeypatch.undo()
    (workdir / "best" / checkpoint.MODEL_SPEC_FILE).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _main(workdir) == 0
    assert [str(w.message) for w in caught if "half-written" in str(w.message)] == [
        f"{workdir.absolute() / 'best'} was half-written (model.json is missing); moved to "
        f"{workdir.absolute() / 'best.unreadable'}"
    ]
    assert (workdir / "best.unreadable" / checkpoint.VARIABLES_ITEM).is_dir()
    assert checkpoint.load_model_spec(workdir / "best")["metadata"]["step"] == 16
    _assert_same_result(workdir, uninterrupted)


def test_failed_save_mid_run_keeps_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    original = ocp.handlers.JsonCheckpointHandler.async_save
    disk = {"full": False}

    async def save(self, *args, **kwargs):
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", save)
    _at_step(monkeypatch, 12, lambda: disk.update(full=True))
    assert _main(workdir) == faults.EXIT_SAVE_FAILED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not save the checkpoint of step 16") and "No space left" in err
    assert "previous checkpoint (step 8) is intact" in err
    monkeypatch.undo()
    assert _steps(workdir) == [8] and not (workdir / "summary.json").exists()
    assert _main(workdir) == 0  # space freed: the same command carries on from step 8
    _assert_same_result(workdir, uninterrupted)
