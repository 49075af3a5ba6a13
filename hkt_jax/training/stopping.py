"""When the training loop stops early: signals (Ctrl-C, preemption) and non-finite steps.

``StopOnSignal`` turns SIGINT/SIGTERM into a request the loop answers after the
current step (checkpoint of that step, then ``cli.Interrupted``); a second
signal ends the process at once (the default action). ``NonFiniteGuard`` keeps the bitmask the jitted train step
returns (which of loss, L1-L3, gradient norm, parameters went NaN/inf) on the
device and reads the bits of all steps since the last check only when the loop
fetches anyway (a logging window, an evaluation, a checkpoint, a stop): then it
stops the run naming the first bad step, or counts the skipped updates when
``train.skip_nonfinite_steps`` allows them. Nothing is saved without that check,
so a checkpoint never holds a non-finite state. On several processes every
decision is one all processes agree on: the bitmask is a replicated output of
the step, and the signal flag is combined over processes every
``SIGNAL_SYNC_STEPS`` steps (a process that got no signal still stops at the
same step, so the checkpoint collective matches).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.training.faults import NonFiniteError

# Bit i of the step's ``nonfinite`` output is set when NONFINITE_TERMS[i] is NaN or inf.
NONFINITE_TERMS = ("loss", "l1", "l2", "l3", "grad_norm", "params")
TERM_NAMES = {
    "loss": "total loss",
    "l1": "L1 (backbone inheritance loss)",
    "l2": "L2 (task loss)",
    "l3": "L3 (head inheritance loss)",
    "grad_norm": "gradient norm",
    "params": "parameters after the update",
}


def nonfinite_bits(metrics: dict[str, jax.Array], grad_norm: jax.Array, new_params: Any) -> jax.Array:
    """int32 bitmask of the NONFINITE_TERMS that are not finite (inside jit: a few reductions)."""
    values = {**{k: metrics[k] for k in ("loss", "l1", "l2", "l3") if k in metrics}, "grad_norm": grad_norm}
    bits = jnp.zeros((), jnp.int32)
    for i, term in enumerate(NONFINITE_TERMS):
        if term == "params":
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
        elif term in values:
            finite = jnp.all(jnp.isfinite(values[term]))
        else:
            continue
        bits = bits | jnp.where(finite, 0, 1 << i).astype(jnp.int32)
    return bits


def describe_bits(bits: int) -> str:
    return ", ".join(TERM_NAMES[t] for i, t in enumerate(NONFINITE_TERMS) if bits >> i & 1)


class NonFiniteGuard:
    """Stops at the first non-finite step, or tolerates ``max_in_a_row`` skipped updates in a row.

    ``record`` keeps a step's on-device bitmask without waiting for it; ``check_recorded`` reads all kept
    ones (one wait) and judges them in step order, exactly as if each had been checked at its step."""

    def __init__(self, max_in_a_row: int, total_steps: int, where: str):
        self.max_in_a_row, self.total_steps, self.where = max_in_a_row, total_steps, where
        self.in_a_row = 0
        self.skipped = 0
        self.recorded: list[tuple[int, jax.Array]] = []

    def record(self, done: int, bits: jax.Array) -> None:
        self.recorded.append((done, bits))

    def check_recorded(self, latest_checkpoint: Callable[[], int | None]) -> None:
        """Judge the recorded steps; ``latest_checkpoint()`` (called only to stop) names the last good state."""
        if not self.recorded:
            return
        steps, bits = zip(*self.recorded)
        self.recorded = []
        for done, value in zip(steps, jax.device_get(bits)):
            self.check(done, int(value), latest_checkpoint)

    def check(self, done: int, bits: int, latest_checkpoint: Callable[[], int | None]) -> None:
        if not bits:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row <= self.max_in_a_row:
            print(
                f"warning: step {done}: non-finite {describe_bits(bits)}: update skipped "
                f"({self.in_a_row} in a row, train.skip_nonfinite_steps={self.max_in_a_row})",
                file=sys.stderr,
                flush=True,
            )
            return
        latest_checkpoint = latest_checkpoint()
        kept = (
            f"the latest checkpoint (step {latest_checkpoint}, in {self.where}) holds the last good state"
            if latest_checkpoint is not None
            else "no checkpoint was written yet"
        )
        resume = f"continue from step {latest_checkpoint}" if latest_checkpoint is not None else "start again"
        run_of = f" after {self.in_a_row} in a row" if self.in_a_row > 1 else ""
        raise NonFiniteError(
            f"error: step {done} of {self.total_steps}: non-finite {describe_bits(bits)}{run_of}: training stopped; "
            f"{kept}. Lower optim.learning_rate (or set train.skip_nonfinite_steps=K) and rerun with "
            f"--allow_config_change to {resume}, or use a new --workdir"
        )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))


def _any_process(value: int) -> int:
    """The largest ``value`` over all processes (a tiny all-gather; identity on one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


# On several processes the signal flag is combined (a tiny all-gather, which waits for the device) this often.
SIGNAL_SYNC_STEPS = 10


class StopOnSignal:
    """SIGINT/SIGTERM -> a stop request the loop answers after the current step; a second one exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.signum = self.signum or signum
        # A second signal takes the default action, in the kernel: the process ends at once, even inside a
        # long compiled call where no Python handler could run (the saved checkpoints stay as they are).
        for each in self.SIGNALS:
            signal.signal(each, signal.SIG_DFL)
        print(
            f"\n{name}: stopping after the current step and saving a checkpoint of it "
            f"({'Ctrl-C' if signum == signal.SIGINT else name} again quits at once, without saving)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, done: int) -> int:
        """The signal number to stop for after step ``done`` (0: go on), the same on every process; on
        several processes a signal is acted on at the next multiple of ``SIGNAL_SYNC_STEPS``."""
        if jax.process_count() == 1:
            return self.signum
        return _any_process(self.signum) if done % SIGNAL_SYNC_STEPS == 0 else 0


def time_is_due(local_due: bool) -> bool:
    """A time-based decision every process takes the same way (clocks differ between hosts)."""
    return bool(_any_process(int(local_due)))
