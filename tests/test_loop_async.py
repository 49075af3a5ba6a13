"""The pieces that keep the training loop from waiting for the device: batches prefetched onto the mesh
(paired with the data position a checkpoint must record), non-finite flags judged at the next fetch as if
each step had been checked at once, and a failed restore that stays quiet. The whole loop with them is
exercised in ``test_faults.py`` and ``test_train_loop.py``."""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.training import checkpoint, hooks, sharding, stopping
from hkt_jax.training.faults import NonFiniteError


class _Counting:
    """A train stream whose batch ``i`` (from 1) is filled with ``i``; its state is the batches read."""

    def __init__(self, rows: int = 8):
        self.read, self.rows = 0, rows

    def __next__(self):
        self.read += 1
        return {"x": np.full((self.rows, 2), self.read, np.float32)}

    def get_state(self):
        return {"read": self.read}


def test_prefetch_places_batches_ahead_and_pairs_each_with_its_position():
    mesh = sharding.make_mesh()
    source = _Counting()
    batches = sharding.DevicePrefetch(source, mesh, size=3)
    assert batches.position() == {"read": 0} and source.read == 0  # nothing read before the first step
    for expected in (1, 2, 3, 4):
        batch = next(batches)
        assert isinstance(batch["x"], jax.Array) and batch["x"].sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch["x"]), expected)
        # A checkpoint now records the position after this batch, although two more were read ahead.
        assert batches.position() == {"read": expected} and source.read == expected + 2
    with pytest.raises(ValueError, match="prefetch size must be >= 1"):
        sharding.DevicePrefetch(source, mesh, size=0)


def _record(guard, bits_by_step):
    for done, bits in enumerate(bits_by_step, start=1):
        guard.record(done, jnp.asarray(bits, jnp.int32))


def test_recorded_flags_are_judged_in_step_order_and_name_the_first_bad_step(capsys):
    latest_asked = []

    def latest():
        latest_asked.append(True)
        return 2

    guard = stopping.NonFiniteGuard(0, 16, "ckpts")
    _record(guard, [0, 0, 0b10000, 0, 0b10000])  # step 3 and 5: gradient norm
    with pytest.raises(
        NonFiniteError,
        match=r"^error: step 3 of 16: non-finite gradient norm: training stopped; "
        r"the latest checkpoint \(step 2, in ckpts\)",
    ):
        guard.check_recorded(latest)
    assert latest_asked == [True] and guard.recorded == []

    # Skipping up to 2 in a row: two runs of skips pass (warned at once, in order), the third in a row stops.
    guard = stopping.NonFiniteGuard(2, 16, "ckpts")
    _record(guard, [0, 1, 1, 0, 1])
    guard.check_recorded(latest)
    assert guard.state_dict() == {"in_a_row": 1, "skipped": 3}
    warned = capsys.readouterr().err
    assert warned.index("step 2: non-finite total loss") < warned.index("step 3:") < warned.index("step 5:")
    for done in (6, 7):
        guard.record(done, jnp.asarray(1, jnp.int32))
    with pytest.raises(NonFiniteError, match="step 7 of 16: non-finite total loss after 3 in a row"):
        guard.check_recorded(latest)
    guard.check_recorded(lambda: pytest.fail("nothing recorded: nothing to judge"))


def test_restore_stays_quiet_about_closed_loop_callbacks_of_the_step_that_fails(tmp_path, monkeypatch):
    """Orbax's unfinished reads of a damaged step report ``Event loop is closed`` through
    ``sys.unraisablehook``, even while the failed restore is still unwinding: dropped; other reports are not."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    manager = checkpoint.training_manager(tmp_path)
    state = {"w": jnp.arange(4.0)}
    for step in (1, 2):
        checkpoint.save_training(manager, step, jax.tree.map(lambda x: x * step, state), {"position": step})
        checkpoint.finish_save(manager, None)
    read = manager.restore

    def restore(step, args):
        if step == 2:  # what a truncated file's read leaves behind, reported before the error is caught
            for error in (RuntimeError("Event loop is closed"), ValueError("a real problem")):
                sys.unraisablehook(
                    types.SimpleNamespace(
                        exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=None
                    )
                )
            raise OSError("truncated")
        return read(step, args=args)

    monkeypatch.setattr(manager, "restore", restore)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with pytest.warns(UserWarning, match=r"step 2 \(OSError: truncated\).*resuming from step 1"):
        restored = checkpoint.restore_latest_readable(manager, abstract)
    manager.close()
    assert restored.step == 1 and restored.data == {"position": 1}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.arange(4.0))
    assert [str(u.exc_value) for u in reported] == ["a real problem"]


class _Bar:
    disable = False

    def __init__(self):
        self.shown = []

    def set_postfix(self, refresh=True, **values):
        self.shown.append(values)


class _Writer:
    def write(self, step, row):
        return {"step": step, **{k: float(v) for k, v in row.items()}}


def test_progress_bar_shows_the_first_steps_loss_until_the_first_window():
    """Step 1's loss at once (one fetch), nothing read at steps 2-3; from the first window on, its means."""
    bar = _Bar()
    log = hooks.LogMetrics(_Writer(), every=4, total=8, batch_size=2, progress=bar)
    log(1, None, {"loss": jnp.asarray(1.0)})
    assert bar.shown == [{"loss": "1.000 (step 1)"}]
    for done in range(2, 7):
        log(done, None, {"loss": jnp.asarray(float(done))})
    assert [shown["loss"] for shown in bar.shown] == ["1.000 (step 1)", "2.500"]  # 2.5: the mean of steps 1-4
    assert "img_s" in bar.shown[-1]
