"""Per-convolution choice between this project's CPU kernels and XLA's, timed on the running machine.

Why: the kernels are several times faster than XLA on the CPUs they were tuned on and were several times
slower on others (AVX2-only CPUs, before their tiles followed the register file). No static rule holds on
every CPU, so ``conv_impl="auto"`` times both candidates once per convolution (shape, stride and direction:
forward, input gradient, weight gradient, fused folded forward) on the machine that runs it, at trace time
on random arrays of the traced shapes, and runs the kernel only where it is clearly faster (best of
interleaved rounds <= ``MARGIN`` x XLA's, and not slower in the median round). Choices are cached on disk
beside the kernel build, in a file keyed by the CPU (model and flags), the kernel build hash, the thread
count and the jax version, like cuDNN's autotuner; a corrupt or foreign file is ignored and rewritten.
Convolutions under ``MIN_TUNED_FLOPS`` go to XLA untimed: there the difference is below the noise and the
timing would cost more than it saves. First-use cost: ~0.5 s per convolution (two compilations and up to
``BUDGET_S`` of timing), ~13 s for the 24 of ResNet-20/110 at batch 128 on a 2-core machine.

``$HKT_JAX_CONV_AUTO``: ``tune`` (default), ``kernel`` (every convolution the kernels take, untimed) or
``xla`` (none). ``$HKT_JAX_CONV_TUNE_ROUNDS`` bounds the timed rounds per choice (default 15;
at least 3, and no more once they took ``BUDGET_S``).
"""

from __future__ import annotations

import atexit
import hashlib
import fcntl
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from hkt_jax.runtime import cpu_info
from hkt_jax.kernels import build

MODES = ("tune", "kernel", "xla")
MARGIN = 0.9  # the kernel must take <= 90% of XLA's time
MIN_TUNED_FLOPS = 2e7  # ~1 ms of work or less: XLA, untimed
MIN_ROUNDS, BUDGET_S = 3, 1.0  # after MIN_ROUNDS, stop once the timed calls took BUDGET_S
timer = time.perf_counter  # tests replace it with a fake clock

_memory: dict[tuple[str, str], dict[str, Any]] = {}
_lock = threading.RLock()
_session = {"count": 0, "seconds": 0.0, "kernel": 0, "path": None, "announced": set()}


def mode() -> str:
    value = os.environ.get("HKT_JAX_CONV_AUTO", "tune")
    if value not in MODES:
        raise ValueError(f"HKT_JAX_CONV_AUTO must be one of {MODES}, got {value!r}")
    return value


def _rounds() -> int:
    return max(1, int(os.environ.get("HKT_JAX_CONV_TUNE_ROUNDS", "15")))


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def signature(library: build.KernelLibrary) -> dict[str, Any]:
    """Everything a choice depends on besides the convolution itself."""
    return {
        "cpu": cpu_info.describe_cpu(),
        "cpu_signature": cpu_info.cpu_signature(),
        "march": library.march,
        "xla_max_isa": cpu_info.xla_max_isa(),
        "library": library.key,
        "threads": _threads(),
        "jax": jax.__version__,
    }


def choices_dir() -> Path:
    return build.cache_dir()  # beside the kernel builds


def cache_path(sig: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    return choices_dir() / f"conv_choices-{digest}.json"


def read_choices(path: Path, sig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cached choices, or {} when the file is missing, unreadable, corrupt or for another signature."""
    try:
        data = json.loads(path.read_text())
        if data.get("signature") != sig or not isinstance(data.get("choices"), dict):
            return {}
        choices = data["choices"].items()
        return {k: v for k, v in choices if isinstance(v, dict) and v.get("choice") in ("kernel", "xla")}
    except (OSError, ValueError, AttributeError):
        return {}


def write_choice(path: Path, sig: dict[str, Any], key: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add one choice to the file unless another process recorded that key first; returns the recorded
    entry, which the caller must use. First writer wins, under a file lock, so every process on this
    machine makes the same choice for the same convolution: a run resumed in a new process computes
    bit-identically to one that never stopped (atomic replace: readers never see half a file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            choices = read_choices(path, sig)
            if key in choices:
                return choices[key]
            choices[key] = entry
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
                json.dump({"signature": sig, "choices": choices}, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only cache only costs re-tuning in the next process
    return entry


def measure(candidates: dict[str, Callable], args: tuple) -> dict[str, float]:
    """Seconds per call of each jitted candidate on ``args``, median and best (``<name>_best``), compiled,
    warmed, then timed in interleaved rounds with alternating order; ``ratio``: kernel / XLA of the best
    times; ``paired_ratio``: median over rounds of kernel / XLA within the round. Other processes only ever
    add time, in bursts that on a busy 2-core machine hit most rounds of a few milliseconds: the best time
    is the estimate they disturb least, and the paired median guards it against one lucky call."""
    compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in candidates.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    spent, names = 0.0, list(compiled)
    for i in range(_rounds()):
        for name in names if i % 2 == 0 else names[::-1]:
            start = timer()
            jax.block_until_ready(compiled[name](*args))
            samples[name].append(timer() - start)
            spent += samples[name][-1]
        if i + 1 >= MIN_ROUNDS and spent > BUDGET_S:
            break
    result = {name: statistics.median(times) for name, times in samples.items()}
    result.update({f"{name}_best": min(times) for name, times in samples.items()})
    paired = [k / max(x, 1e-12) for k, x in zip(samples["kernel"], samples["xla"])]
    return {
        **result,
        "ratio": result["kernel_best"] / max(result["xla_best"], 1e-12),
        "paired_ratio": statistics.median(paired),
    }


def choose(seconds: dict[str, float], margin: float = MARGIN) -> str:
    """ "kernel" only when clearly faster than XLA: best-time ratio <= ``margin`` and not slower in the
    median round."""
    return "kernel" if seconds["ratio"] <= margin and seconds.get("paired_ratio", 0.0) <= 1.0 else "xla"


def random_operands(shapes: tuple[tuple[int, ...], ...], seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return tuple(jax.device_put(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)


def use_kernel(
    key: str,
    flops: float,
    library: build.KernelLibrary,
    candidates: Callable[[], tuple[dict[str, Callable], tuple[tuple[int, ...], ...]]],
) -> bool:
    """Whether the convolution ``key`` runs the kernel. ``candidates()`` gives {"kernel": f, "xla": g} and
    the operand shapes to time them on; it is called only when the choice is neither cached nor forced."""
    forced = mode()
    if forced != "tune":
        return forced == "kernel"
    if flops < MIN_TUNED_FLOPS:
        return False
    sig = signature(library)
    path = cache_path(sig)
    with _lock:  # one tuning at a time: timings must not overlap
        entry = _memory.get((str(path), key)) or read_choices(path, sig).get(key)
        if entry is None:
            entry = write_choice(path, sig, key, _tune(key, candidates, sig, path))
        _memory[(str(path), key)] = entry
    return entry["choice"] == "kernel"


def _tune(key, candidates, sig, path) -> dict[str, Any]:
    if path not in _session["announced"]:
        print(
            f"hkt_jax: tuning CPU convolutions for {sig['cpu']}: timing kernel vs XLA once per new convolution "
            f"(cached in {path})",
            file=sys.stderr,
            flush=True,
        )
        if not _session["announced"]:
            atexit.register(_report)
        _session["announced"].add(path)
    start = time.perf_counter()
    with jax.ensure_compile_time_eval():  # run now on concrete arrays, even while tracing a jitted function
        fns, shapes = candidates()
        try:
            seconds = measure(fns, random_operands(shapes))
            entry = {
                "choice": choose(seconds),
                "kernel_over_xla": round(seconds["ratio"], 4),
                "paired_kernel_over_xla": round(seconds["paired_ratio"], 4),
                "kernel_ms": round(seconds["kernel"] * 1e3, 4),
                "xla_ms": round(seconds["xla"] * 1e3, 4),
            }
        except Exception as err:  # noqa: BLE001 -- a kernel that cannot run here must not stop training
            entry = {"choice": "xla", "error": f"{type(err).__name__}: {err}"[:300]}
    _session["count"] += 1
    _session["kernel"] += entry["choice"] == "kernel"
    _session["seconds"] += time.perf_counter() - start
    _session["path"] = path
    return entry


def _report() -> None:
    if _session["count"]:
        print(
            f"hkt_jax: tuned CPU convolutions for {cpu_info.describe_cpu()}: {_session['count']} shapes, "
            f"{_session['seconds']:.1f} s ({_session['kernel']} run the kernels; cached in {_session['path']})",
            file=sys.stderr,
            flush=True,
        )
