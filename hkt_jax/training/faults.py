"""What a command-line entry point does when something goes wrong: one line, a documented exit code.

Every experiment entry point (``experiments/cifar_hkt.py``, ``flow_hkt.py``,
``seg_hkt.py``) runs through ``hkt_jax.training.experiment_cli.main``, which wraps its work in ``main_guard``::

    parser = argparse.ArgumentParser(...)
    faults.add_common_arguments(parser)          # --debug, --allow_config_change, --no_compile_cache
    args = parser.parse_args(argv)
    return faults.main_guard(lambda: work(args), debug=args.debug)

where ``work`` builds its config with ``faults.as_user_error(lambda: apply_overrides(...))``
and calls ``experiment.run(config, workdir, allow_config_change=args.allow_config_change)``.

The library raises ``UserError`` for what the user can fix (a config value, a
path, a data file) and ``RunStopped`` when a run ended early on purpose (a
signal, a non-finite loss, a failed save) after saving what it could. The guard
turns those into one line on stderr and the exit code below; ``--debug`` or
``HKT_JAX_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, TypeVar

T = TypeVar("T")

# Exit codes (documented in docs/faults.md, "When things go wrong").
EXIT_OK = 0
EXIT_USAGE = 2  # bad input: config value, path, data or checkpoint file; nothing was written
EXIT_NONFINITE = 3  # loss or gradients became NaN/inf; the last good checkpoint is the latest
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written; the previous one is intact
EXIT_SIGINT = 130  # stopped by Ctrl-C after saving the current step (128 + SIGINT)
EXIT_SIGTERM = 143  # stopped by SIGTERM (preemption, SLURM, Kubernetes) after saving (128 + SIGTERM)

DEBUG_ENV = "HKT_JAX_DEBUG"


class UserError(ValueError):
    """Something the user can fix (names their key or path); entry points print it as one line, exit 2."""


class RunStopped(Exception):
    """A run ended before its last step on purpose, after saving what it could; ``str`` says how to go on."""

    exit_code = 1


class NonFiniteError(RunStopped):
    exit_code = EXIT_NONFINITE


class CheckpointSaveError(RunStopped):
    exit_code = EXIT_SAVE_FAILED


class Interrupted(RunStopped):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def debug_requested(debug: bool = False) -> bool:
    return debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show full tracebacks instead of one-line errors (or set {DEBUG_ENV}=1)"
    )
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume a workdir although its config.json differs in keys that are not always safe "
        "to change (e.g. the learning rate); the new values are used from the restored step on",
    )
    parser.add_argument(
        "--no_compile_cache",
        action="store_true",
        help="do not keep compiled programs for the next run (default: JAX's persistent compilation "
        "cache in $HKT_JAX_COMPILE_CACHE or ~/.cache/hkt_jax/jax_compilation_cache; "
        "HKT_JAX_COMPILE_CACHE=0 also turns it off)",
    )


def as_user_error(make: Callable[[], T]) -> T:
    """``make()``, with its ``ValueError`` (a bad config value, an unknown key) reported as the user's error."""
    try:
        return make()
    except UserError:
        raise
    except ValueError as error:
        raise UserError(str(error)) from error


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself): leave quietly."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def main_guard(body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run ``body``; user errors, early stops and interrupts become one line on stderr and an exit code."""
    debug = debug_requested(debug)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(body() or EXIT_OK)
    except RunStopped as stop:
        if debug:
            raise
        print(str(stop), file=sys.stderr, flush=True)
        return stop.exit_code
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            "interrupted outside the training steps (start-up, evaluation or export); every saved checkpoint "
            "is kept: rerun the same command to continue",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SIGINT
    except _Terminated:
        print(
            "terminated by SIGTERM outside the training steps (start-up, evaluation or export); every saved "
            "checkpoint is kept: rerun the same command to continue",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
