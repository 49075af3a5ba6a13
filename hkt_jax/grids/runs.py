"""Up to K runs of a grid at once, each its own process, with a deadline and a clean stop.

Why processes (not ``jax.vmap`` over seeds in one program): each run stays an ordinary, resumable
experiment run through the one training loop, and ``experiments/bench_parallel.py`` measured no gain from
vmapping seeds on the CPU (see docs/grids.md). Why a deadline: accelerator slots end (Slurm time limits,
spot instances). At the deadline, or when this process gets SIGTERM/SIGINT, every running run is sent one
SIGTERM: it finishes its step, saves a checkpoint of it and exits 143, which is recorded as *stopped*, not
failed, and rerunning the same command resumes it. No run starts after the deadline, nor shortly before it
(a run that cannot reach its first step in time would only spend the slot compiling).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from hkt_jax.grids import comparison
from hkt_jax.training.faults import EXIT_SIGINT, EXIT_SIGTERM
from hkt_jax.grids.pack import newest_checkpoint_step

TAIL_CHARS = 4000
# A run ended by a stop request (its own handler: 130/143; killed before it installed one: -2/-15).
STOPPED_CODES = (EXIT_SIGTERM, EXIT_SIGINT, -signal.SIGTERM, -signal.SIGINT)
STOPPING_NOTICE = b"stopping after the current step"  # what a run's StopOnSignal prints when signalled
MEMORY_SHARE = 0.9  # of one accelerator's memory, split between the runs sharing it


@dataclasses.dataclass(frozen=True)
class Job:
    label: str  # e.g. "[3/8] hkt seed 1": how progress lines name the run
    directory: Path  # its workdir; its output goes to run.log there
    command: list[str]
    verb: str = "running"  # "running", "resuming" or "retrying": what starting it means


def child_environment(parallel: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of each run: with several runs on one accelerator each takes memory as it needs it,
    up to its share (no preallocation fight). Values the user set are kept."""
    env = dict(os.environ if base is None else base)
    if parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{MEMORY_SHARE / parallel:.3f}")
    return env


@dataclasses.dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    started: float
    log_offset: int  # run.log's size at launch: a stop notice after it is this launch's
    signalled: bool = False


class GridRunner:
    """Runs jobs K at a time, in order; ``stop()`` (a signal handler may call it) or the deadline ends them.

    ``deadline`` is a ``time.monotonic()`` value; ``min_start_s``: no job starts with less time left.
    ``report(line)`` receives the progress lines."""

    def __init__(
        self,
        *,
        parallel: int = 1,
        deadline: float | None = None,
        min_start_s: float = 0.0,
        env: dict[str, str] | None = None,
        report: Callable[[str], None] = print,
        poll_s: float = 0.2,
    ):
        if parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {parallel}")
        self.parallel, self.deadline, self.min_start_s = parallel, deadline, min_start_s
        self.env = child_environment(parallel, env)
        self.report, self.poll_s = report, poll_s
        self.commit = comparison.current_commit()  # recorded with every launch (attempts.json)
        self.stop_reason: str | None = None
        self._forward_at = 0.0
        self._no_more_starts = False
        self._running: list[_Running] = []

    def stop(self, reason: str, grace_s: float = 0.0) -> None:
        """Ask every running job to stop (after ``grace_s``: a signal that reached the whole process group
        or cgroup reached the runs too, and a second one would end them without saving); start no more.
        A second call while stopping sends another SIGTERM, which ends the runs at once."""
        if self.stop_reason is not None:
            for running in self._running:
                _signal(running.process, signal.SIGTERM)
            return
        self.stop_reason = reason
        self._forward_at = time.monotonic() + grace_s

    def run(self, jobs: list[Job]) -> dict[str, str]:
        """Each job's outcome: "done", "partial" (exited 0 without a summary), "stopped", "failed", or
        "not started" (stopped or out of time before its turn)."""
        outcomes: dict[str, str] = {}
        pending = list(jobs)
        try:
            while pending or self._running:
                now = time.monotonic()
                if self.stop_reason is None and self.deadline is not None and now >= self.deadline:
                    self.stop("the time budget is spent")
                if self.stop_reason is not None and now >= self._forward_at:
                    self._forward_stop()
                if pending and not self._no_more_starts and self._too_late_to_start(now, len(pending)):
                    self._no_more_starts = True  # the running ones carry on until the deadline
                if pending and (self.stop_reason is not None or self._no_more_starts):
                    outcomes.update((job.label, "not started") for job in pending)
                    pending = []
                while pending and len(self._running) < self.parallel:
                    self._start(pending.pop(0))
                for running in list(self._running):
                    if running.process.poll() is not None:
                        self._running.remove(running)
                        outcomes[running.job.label] = self._finish(running)
                if self._running:
                    time.sleep(self.poll_s)
        finally:
            for running in self._running:  # only on an error in here: the runs must not outlive this process
                _signal(running.process, signal.SIGTERM)
                running.process.wait()
        return outcomes

    def _too_late_to_start(self, now: float, waiting: int) -> bool:
        if self.deadline is None or self.deadline - now >= self.min_start_s:
            return False
        self.report(
            f"{waiting} run(s) not started: {max(0.0, self.deadline - now):.0f} s of the time budget left, "
            f"less than the {self.min_start_s:.0f} s a run needs to get going"
        )
        return True

    def _start(self, job: Job) -> None:
        job.directory.mkdir(parents=True, exist_ok=True)
        comparison.clear_failure(job.directory)
        log_path = job.directory / "run.log"
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(job.command)}\n".encode())
            offset = log.tell()
            # Own session: a Ctrl-C in the terminal reaches only this process, which forwards one SIGTERM.
            process = subprocess.Popen(
                job.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self._running.append(_Running(job, process, time.monotonic(), offset))
        self.report(f"{heading(job.label)} {job.verb} (log: {log_path})")

    def _forward_stop(self) -> None:
        for running in self._running:
            if running.signalled:
                continue
            running.signalled = True
            if _stop_notice_since(running.job.directory / "run.log", running.log_offset):
                continue  # it got the signal itself (a cgroup-wide SIGTERM) and is already stopping
            _signal(running.process, signal.SIGTERM)
            self.report(f"{heading(running.job.label)} asked to stop ({self.stop_reason}); it saves its current step")

    def _finish(self, running: _Running) -> str:
        code, directory = running.process.returncode, running.job.directory
        seconds = time.monotonic() - running.started
        if code == 0:
            status = comparison.run_status(directory)
        elif code in STOPPED_CODES:
            status = "stopped"
        else:
            tail = (directory / "run.log").read_bytes()[-TAIL_CHARS:].decode(errors="replace")
            comparison.record_failure(directory, code, tail)
            status = "failed"
        comparison.record_attempt(directory, self.commit, seconds, status)
        step = newest_checkpoint_step(directory) if status == "stopped" else None
        where = f" at step {step}" if step is not None else ""
        self.report(f"{heading(running.job.label)} {status}{where} in {seconds:.0f} s")
        return status


def heading(label: str) -> str:
    """How a progress line starts: "[parent] ..." or "[3/8] hkt seed 1: ..."."""
    return label if label.endswith("]") else f"{label}:"


def _signal(process: subprocess.Popen, signum: int) -> None:
    if process.poll() is None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def _stop_notice_since(log_path: Path, offset: int) -> bool:
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            return STOPPING_NOTICE in log.read()
    except OSError:
        return False
