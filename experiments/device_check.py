"""The device check: ``python -m experiments.device_check [--quick] [--json F] [--budget_s S] [--only NAMES]``.

On whatever accelerator JAX finds (or the CPU), in one command: the ``gpu`` test subset, the smoke
run cold and warm, ``bench_train`` (float32 against PyTorch eager / torch.compile / AMP on the same
device, and bfloat16), ``bench_ga`` at N=16,384 (float32 and bfloat16), ``bench_raft`` against
torchvision on the same device, a ResNet-110 on the shared CIFAR-10 archive leaving chance, and a
real-data training run whose img/s is compared with bench_train's HKT step. It prints one table
(each number, its target, pass / fail / skipped and why) and writes JSON: ``device``, ``checks``
(plain numbers, or null with the reason in ``reasons``), ``table`` and each sub-command's record.

Every piece is a subprocess with its own timeout, so one that crashes or hangs loses only its own
numbers; the whole run keeps within ``--budget_s`` (default 300 s: it must fit, with a rerun, in a
short GPU slot), skipping what no longer fits. The numbers come from the sub-commands' own JSON
(``--json`` of the benches, pytest's ``--junitxml``, the run's ``metrics.jsonl``). The targets are
the H200 ones (issue 23); on a CPU only the functional checks (tests, the parent running once,
ResNet-110 leaving chance) are judged, the speeds are printed as measured.

``--quick`` (a 2-core CPU in about 2 minutes): two of the ``gpu`` tests, the smoke's child at 4 steps,
the benches in quick mode without PyTorch and in float32 only, no real-data runs; the keys are all there,
null with a reason for what it did not measure. Sub-command logs go to ``--workdir`` (default: a temporary folder).
Children get ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless set, so two can share the GPU, and a JAX
compilation cache in the workdir (``JAX_COMPILATION_CACHE_DIR`` unless set; the smoke has its own): rerun
with the same ``--workdir`` and compilation is mostly skipped. A check stopped at its timeout gets Ctrl-C
first (pytest still writes its report), then SIGKILL.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hkt_jax.runtime import paths

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path("cifar10-q75") / "cifar10-q75-imagefolder.tar.gz"
RESNET56_TORCH = Path("resnet-cifar10-torch") / "resnet56-4bfd9763.th"
QUICK_TESTS = (
    "tests/test_hkt.py::test_classification_losses_match_numpy",  # gpu-marked, and cheap to collect
    "tests/test_sharding.py::test_hlo_collective_parser",
)
GA_CASE = "n16384"
LOOP_STEPS, LOG_EVERY = 300, 50  # the real-data run: 6 logged windows; the first (compilation) is dropped
CHANCE_STEPS = (300, 400)  # ResNet-110 must be above chance over these steps
QUICK_NO_BF16 = (
    "--quick: float32 only (bfloat16 is emulated on CPUs, its speed judged on GPUs only; "
    "tests/test_mixed_precision.py tests it)"
)


@dataclasses.dataclass(frozen=True)
class Target:
    text: str
    met: Callable[[Any], bool]
    functional: bool = False  # judged on every backend; speed targets only on GPUs


TARGETS: dict[str, Target] = {
    "tests_passed": Target("> 0", lambda v: v > 0, functional=True),
    "tests_failed": Target("== 0", lambda v: v == 0, functional=True),
    "tests_skipped": Target("", lambda v: True, functional=True),
    "parent_runs_once": Target("true", lambda v: v is True, functional=True),
    "hkt_step_vs_torch_eager": Target("<= 0.30", lambda v: v <= 0.30),
    "hkt_step_vs_torch_compile": Target("<= 1.00", lambda v: v <= 1.0),
    "hkt_step_vs_torch_amp": Target("", lambda v: True),
    "hkt_step_bf16_vs_f32": Target("<= 0.75", lambda v: v <= 0.75),
    "loop_vs_step_throughput": Target(">= 0.95", lambda v: v >= 0.95),
    "smoke_cold_s": Target("<= 30", lambda v: v <= 30),
    "smoke_warm_s": Target("<= 15", lambda v: v <= 15),
    "ga_auto_fb_ms_n16384_f32": Target("<= 5.0", lambda v: v <= 5.0),
    "ga_auto_fb_ms_n16384_bf16": Target("<= 1.2", lambda v: v <= 1.2),
    "raft_infer_vs_torchvision": Target(">= 3", lambda v: v >= 3),
    "raft_train_vs_torchvision": Target(">= 3", lambda v: v >= 3),
    "resnet110_leaves_chance": Target("> 0.20", lambda v: v > 0.20, functional=True),
}
"""What the table judges: the keys of ``checks``, each with its (H200) target."""


# -- running sub-commands -----------------------------------------------------------------------------


class Runner:
    """Starts sub-commands in their own process groups with logs in ``workdir`` and keeps the budget."""

    def __init__(self, workdir: Path, budget_s: float):
        self.workdir, self.deadline = workdir, time.monotonic() + budget_s
        self.records: dict[str, dict[str, Any]] = {}
        self.env = dict(
            os.environ,
            XLA_PYTHON_CLIENT_PREALLOCATE=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        )
        # One persistent compilation cache for the checks (the smoke keeps its own, to be cold): a rerun in
        # the same workdir, and a program two checks both compile, compile once.
        self.env.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "jax_cache"))
        if self.env.get("HKT_JAX_COMPILE_CACHE", "").lower() in ("0", "off", "false", "no"):
            del self.env["HKT_JAX_COMPILE_CACHE"]  # turned off by the caller; the checks measure it

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, args: list[str], timeout_s: float, env: dict[str, str] | None = None):
        """A started job, or None (recorded as skipped) when the budget has less than 10 s left."""
        timeout_s = min(timeout_s, self.left_s())
        if timeout_s < 10:
            self.records[name] = {"cmd": args, "skipped": "out of the time budget (--budget_s)"}
            return None
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, *args]
        print(f"[device_check] {name}: {' '.join(args)} (timeout {timeout_s:.0f} s, log {log})", flush=True)
        handle = log.open("w")
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env={**self.env, **(env or {})},
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return {
            "name": name,
            "args": args,
            "proc": proc,
            "log": log,
            "handle": handle,
            "start": time.monotonic(),
            "timeout_s": timeout_s,
        }

    def wait(self, job) -> dict[str, Any] | None:
        if job is None:
            return None
        proc, timed_out = job["proc"], False
        try:
            proc.wait(timeout=max(0.0, job["start"] + job["timeout_s"] - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: pytest still writes its junit XML, a run its checkpoint
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the job and whatever it started
                proc.wait()
        job["handle"].close()
        seconds = time.monotonic() - job["start"]
        record = {
            "cmd": job["args"],
            "rc": proc.returncode,
            "seconds": round(seconds, 1),
            "timed_out": timed_out,
            "log": str(job["log"]),
        }
        if proc.returncode != 0:
            record["tail"] = job["log"].read_text(errors="replace")[-1500:]
        self.records[job["name"]] = record
        status = "timed out" if timed_out else f"rc {proc.returncode}"
        print(f"[device_check] {job['name']}: {status} after {seconds:.1f} s", flush=True)
        return record

    def run(self, name: str, args: list[str], timeout_s: float, env: dict[str, str] | None = None):
        return self.wait(self.start(name, args, timeout_s, env))


def failure_reason(name: str, record: dict[str, Any] | None, runner: Runner) -> str:
    record = record or runner.records.get(name, {})
    if "skipped" in record:
        return f"{name}: {record['skipped']}"
    if record.get("timed_out"):
        return f"{name}: timed out after {record['seconds']} s (log {record['log']})"
    last = [line for line in record.get("tail", "").strip().splitlines() if line.strip()]
    return f"{name}: exit code {record.get('rc')}: {last[-1][:300] if last else 'no output'} (log {record.get('log')})"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- the checks ---------------------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.checks: dict[str, Any] = {key: None for key in TARGETS}
        self.reasons: dict[str, str] = {}
        self.details: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        self.checks[key] = value
        self.reasons.pop(key, None)

    def missing(self, keys, reason: str) -> None:
        """Why these keys, where still unmeasured, have no value (the first reason given stands)."""
        for key in keys:
            if self.checks.get(key) is None:
                self.reasons.setdefault(key, reason)


def start_gpu_tests(runner: Runner, quick: bool):
    """The ``gpu`` subset (a handful of it under --quick), results read from pytest's junit XML."""
    if importlib.util.find_spec("pytest") is None:
        runner.records["gpu_tests"] = {
            "skipped": f"pytest is not installed for {sys.executable}: add its wheels "
            "(pytest, pluggy, iniconfig, packaging) to the machine"
        }
        return None
    from tests.conftest import GPU_SUBSET  # imports pytest: only now that it is known to be there

    xml = runner.workdir / "gpu_tests.xml"
    modules = [f"tests/{name}" for name in sorted(GPU_SUBSET)]  # collect only these, not the whole suite
    args = [
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit1",
        *(QUICK_TESTS if quick else modules),
    ]
    return runner.start("gpu_tests", args, 90 if quick else 150)


def finish_gpu_tests(runner: Runner, job, results: Results) -> None:
    record = runner.wait(job)
    keys = ("tests_passed", "tests_failed", "tests_skipped")
    root = None
    try:
        root = ET.parse(runner.workdir / "gpu_tests.xml").getroot()
    except (OSError, ET.ParseError):
        pass
    if root is None:
        results.missing(keys, failure_reason("gpu_tests", record, runner))
        return
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    results.set("tests_passed", total - failed - skipped)
    results.set("tests_failed", failed)
    results.set("tests_skipped", skipped)
    results.details["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    if record and record.get("timed_out"):
        results.details["gpu_tests_note"] = "pytest timed out: the counts cover the tests that finished"


def check_smoke(runner: Runner, results: Results, quick: bool) -> None:
    """The smoke run twice in fresh workdirs: cold (an empty JAX compilation cache, named by
    ``JAX_COMPILATION_CACHE_DIR``), then warm (the same cache); wall seconds of the whole command."""
    cache = runner.workdir / "jax_compilation_cache"
    few = (
        [
            "method=child",
            "train.steps=4",
            "train.log_every_steps=2",
            "train.eval_every_steps=4",
            "train.checkpoint_every_steps=4",
            "data.synthetic_train_size=256",
            "data.validation_size=64",
            "data.synthetic_test_size=64",
        ]
        if quick
        else []
    )
    for key, name in (("smoke_cold_s", "smoke_cold"), ("smoke_warm_s", "smoke_warm")):
        record = runner.run(
            name,
            ["-m", "experiments.cifar_hkt", "--config", "smoke", "--workdir", str(runner.workdir / name), *few],
            90 if quick else 75,
            env={"JAX_COMPILATION_CACHE_DIR": str(cache), "HKT_JAX_COMPILE_CACHE": str(cache)},
        )
        if record and record["rc"] == 0:
            results.set(key, record["seconds"])
        else:
            results.missing([key], failure_reason(name, record, runner))
    if quick:
        results.details["smoke_note"] = "--quick: the child alone, 4 steps on reduced synthetic data"


def check_bench_train(runner: Runner, results: Results, quick: bool, compute_dtype_available: bool) -> dict | None:
    """float32 against PyTorch (eager, and compiled / AMP on an accelerator), then JAX bfloat16."""
    out = runner.workdir / "bench_train_f32.json"
    if quick:
        results.missing(["hkt_step_bf16_vs_f32"], QUICK_NO_BF16)  # the first reason stands, whatever f32 does
        args = ["--quick", "--steps", "2", "--warmup", "0", "--no_torch"]
    else:
        args = ["--steps", "10", "--warmup", "2", "--torch_compile", "--amp"]
    record = runner.run(
        "bench_train_f32",
        ["-m", "experiments.bench_train", *args, "--allreduce_devices", "1", "--json", str(out)],
        90 if quick else 150,
    )
    f32 = read_json(out) if record and record["rc"] == 0 else None
    torch_keys = ("hkt_step_vs_torch_eager", "hkt_step_vs_torch_compile", "hkt_step_vs_torch_amp")
    if f32 is None:
        results.missing(
            ("parent_runs_once", *torch_keys, "hkt_step_bf16_vs_f32"), failure_reason("bench_train_f32", record, runner)
        )
        return None
    results.set("parent_runs_once", bool(f32["convolutions"]["parent_runs_once"]))
    results.details["bench_train"] = {
        key: f32.get(key) for key in ("parent_depth", "child_depth", "batch_size", "devices", "precision", "torch_info")
    }
    results.details["bench_train"]["hkt_step_img_per_s"] = f32["jax"]["hkt_step"]["img_per_s"]
    results.details["bench_train"]["convolutions"] = f32["convolutions"]
    for key, source in zip(torch_keys, ("hkt_jax_over_torch", "hkt_jax_over_torch_compiled", "hkt_jax_over_torch_amp")):
        if source in f32:
            results.set(key, f32[source])
    reason = (
        "--quick: no PyTorch twin (minutes on a loaded 2-core CPU)"
        if quick
        else "PyTorch (or torch.compile) not usable here: see bench_train_f32's log"
    )
    results.missing(torch_keys, reason)

    if not compute_dtype_available:
        results.missing(["hkt_step_bf16_vs_f32"], "not available: this branch's config has no train.compute_dtype")
        return f32
    if quick:
        return f32
    out16 = runner.workdir / "bench_train_bf16.json"
    record = runner.run(
        "bench_train_bf16",
        [
            "-m",
            "experiments.bench_train",
            "--steps",
            "10",
            "--warmup",
            "2",
            "--no_torch",
            "--allreduce_devices",
            "1",
            "--compute_dtype",
            "bfloat16",
            "--json",
            str(out16),
        ],
        100,
    )
    bf16 = read_json(out16) if record and record["rc"] == 0 else None
    if bf16 is None:
        results.missing(["hkt_step_bf16_vs_f32"], failure_reason("bench_train_bf16", record, runner))
    else:
        results.set("hkt_step_bf16_vs_f32", bf16["jax"]["hkt_step"]["median_ms"] / f32["jax"]["hkt_step"]["median_ms"])
    return f32


def ga_auto_fb_ms(report: dict[str, Any], case: str) -> float | None:
    """Forward+backward median ms of what ``impl='auto'`` runs for ``case`` (its own row if the bench has one)."""
    rows = [r for r in report["rows"] if r["case"] == case and r["mode"] == "softmax"]
    auto = [r for r in rows if r["impl"] == "auto"]
    if not auto:
        choice = report.get("auto_choice", {}).get(case)
        if choice is None:
            return None
        auto = [
            r
            for r in rows
            if r["impl"] == choice["impl"]
            and r.get("chunk_size") is None
            and r.get("chunk_rows") == choice.get("chunk_rows")
        ]
    return auto[0]["fwd_bwd_ms"] if auto else None


def check_bench_ga(runner: Runner, results: Results, quick: bool) -> None:
    case = "n2048" if quick else GA_CASE
    for dtype, key in (("float32", "ga_auto_fb_ms_n16384_f32"), ("bfloat16", "ga_auto_fb_ms_n16384_bf16")):
        if quick and dtype == "bfloat16":
            results.missing([key], QUICK_NO_BF16)
            continue
        out = runner.workdir / f"bench_ga_{dtype}.json"
        args = [
            "-m",
            "experiments.bench_ga",
            *(["--quick", "--reps", "2"] if quick else ["--reps", "5"]),
            "--cases",
            case,
            "--json",
            str(out),
            *(["--dtype", dtype] if dtype != "float32" else []),
        ]
        record = runner.run(f"bench_ga_{dtype}", args, 60 if quick else 75)
        report = read_json(out) if record and record["rc"] == 0 else None
        if report is None:
            tail = (record or {}).get("tail", "")
            reason = (
                "not available: bench_ga has no --dtype on this branch"
                if "--dtype" in tail and "unrecognized" in tail
                else failure_reason(f"bench_ga_{dtype}", record, runner)
            )
            results.missing([key], reason)
            continue
        value = ga_auto_fb_ms(report, case)
        results.details[f"ga_auto_fb_ms_{case}_{dtype}"] = value
        results.details.setdefault("ga_auto_choice", {})[dtype] = report.get("auto_choice", {}).get(case)
        if quick:
            results.missing([key], f"--quick: measured at N=2048 instead (details.ga_auto_fb_ms_n2048_{dtype})")
        elif value is None:
            results.missing([key], "bench_ga's report has no row for the auto choice")
        else:
            results.set(key, value)


def check_bench_raft(runner: Runner, results: Results, quick: bool) -> None:
    """RAFT (RAFT-S under --quick) against torchvision: inference and the training step as two runs, so a
    slow compilation of one loses only its own number."""
    keys = {"inference": "raft_infer_vs_torchvision", "train": "raft_train_vs_torchvision"}
    if importlib.util.find_spec("torchvision") is None:
        results.missing(keys.values(), "torchvision is not installed")
        return
    for task, key in keys.items():
        if quick and task == "train":
            results.missing([key], "--quick: RAFT-S inference on small frames only")
            continue
        name, out = f"bench_raft_{task}", runner.workdir / f"bench_raft_{task}.json"
        args = ["--quick", "--sizes", "small", "--repeats", "1"] if quick else ["--sizes", "large", "--repeats", "3"]
        record = runner.run(
            name,
            ["-m", "experiments.bench_raft", *args, "--tasks", task, "--corr_impls", "all_pairs", "--json", str(out)],
            90 if quick else 100,
        )
        report = read_json(out) if record and record["rc"] == 0 else None
        rows = [row for row in (report or {}).get("rows", []) if row["impl"].startswith("jax")]
        if not rows:
            results.missing([key], failure_reason(name, record, runner) if report is None else "no JAX row")
            continue
        results.set(key, rows[0]["torch_over_this"])
        results.details[name] = {
            "config": report.get("config"),
            "torch_device": report.get("torch_device"),
            "jax_median_s": rows[0]["median_s"],
        }


def window_rows(metrics_file: Path) -> list[dict[str, Any]]:
    """The logged training windows of a run (rows with ``img_per_s``), in step order."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "img_per_s" in r), key=lambda r: r["step"])


def accuracy_between(rows: list[dict[str, Any]], first: int, last: int) -> float | None:
    """Training accuracy over steps (first, last], from windows that end in that range."""
    inside = [r["accuracy"] for r in rows if first < r["step"] <= last and r.get("accuracy") is not None]
    return statistics.fmean(inside) if inside else None


def real_data_overrides(archive: Path) -> list[str]:
    return ["data.source=image_folder", f"data.path={archive}"]


def start_resnet110(runner: Runner, archive: Path):
    steps = CHANCE_STEPS[1]
    return runner.start(
        "resnet110",
        [
            "-m",
            "experiments.cifar_hkt",
            "--config",
            "default",
            "--workdir",
            str(runner.workdir / "resnet110"),
            "method=parent",
            "parent.depth=110",
            f"train.steps={steps}",
            f"train.log_every_steps={LOG_EVERY}",
            f"train.eval_every_steps={steps}",
            f"train.checkpoint_every_steps={steps}",
            *real_data_overrides(archive),
        ],
        170,
    )


def finish_resnet110(runner: Runner, job, results: Results) -> Path | None:
    """The ResNet-110's accuracy over steps 300-400, and its export (the real-data run's parent)."""
    record = runner.wait(job)
    metrics = runner.workdir / "resnet110" / "metrics.jsonl"
    if not metrics.exists():
        results.missing(["resnet110_leaves_chance"], failure_reason("resnet110", record, runner))
        return None
    accuracy = accuracy_between(window_rows(metrics), *CHANCE_STEPS)
    if accuracy is None:
        results.missing(
            ["resnet110_leaves_chance"],
            f"no training accuracy logged over steps {CHANCE_STEPS}: " + failure_reason("resnet110", record, runner),
        )
    else:
        results.set("resnet110_leaves_chance", accuracy)
    export = runner.workdir / "resnet110" / "export" / "child"
    return export if record and record["rc"] == 0 and export.exists() else None


def check_real_data_loop(
    runner: Runner, results: Results, archive: Path, parent_110: Path | None, bench_f32: dict | None
) -> None:
    """HKT on the real CIFAR-10 archive for a fixed number of steps; loop img/s over bench_train's HKT step."""
    key = "loop_vs_step_throughput"
    parent_depth, parent = 110, parent_110
    if parent is None:  # no ResNet-110 export: the converted ResNet-56 (bench_train is rerun at that pair)
        parent_depth, parent = 56, runner.workdir / "resnet56"
        source = paths.shared_data_dir() / RESNET56_TORCH
        record = runner.run(
            "convert_resnet56",
            ["-m", "hkt_jax.convert", "resnet", "--src", str(source), "--depth", "56", "--out", str(parent)],
            60,
        )
        if not record or record["rc"] != 0:
            results.missing([key], "no parent: " + failure_reason("convert_resnet56", record, runner))
            return
    results.details["real_data_parent"] = f"ResNet-{parent_depth} " + (
        "trained 400 steps by resnet110_leaves_chance"
        if parent_depth == 110
        else "converted from resnet-cifar10-torch (no ResNet-110 export)"
    )
    workdir = runner.workdir / "real_data_loop"
    record = runner.run(
        "real_data_loop",
        [
            "-m",
            "experiments.cifar_hkt",
            "--config",
            "default",
            "--workdir",
            str(workdir),
            "method=hkt",
            f"parent.depth={parent_depth}",
            f"parent_ckpt={parent}",
            f"train.steps={LOOP_STEPS}",
            f"train.log_every_steps={LOG_EVERY}",
            f"train.eval_every_steps={LOOP_STEPS}",
            f"train.checkpoint_every_steps={LOOP_STEPS}",
            *real_data_overrides(archive),
        ],
        120,
    )
    metrics = workdir / "metrics.jsonl"
    rows = window_rows(metrics)[1:] if metrics.exists() else []  # the first window holds the compilation
    if not rows:
        results.missing([key], failure_reason("real_data_loop", record, runner))
        return
    loop_img_per_s = statistics.median(r["img_per_s"] for r in rows)
    results.details["real_data_loop_img_per_s"] = loop_img_per_s
    step = bench_f32 if bench_f32 and bench_f32["parent_depth"] == parent_depth else None
    if step is None:
        out = runner.workdir / f"bench_train_r{parent_depth}.json"
        bench = runner.run(
            f"bench_train_r{parent_depth}",
            [
                "-m",
                "experiments.bench_train",
                "--parent_depth",
                str(parent_depth),
                "--no_torch",
                "--allreduce_devices",
                "1",
                "--json",
                str(out),
            ],
            90,
        )
        step = read_json(out) if bench and bench["rc"] == 0 else None
        if step is None:
            results.missing([key], failure_reason(f"bench_train_r{parent_depth}", bench, runner))
            return
    results.set(key, loop_img_per_s / step["jax"]["hkt_step"]["img_per_s"])


def compute_dtype_available() -> bool:
    from hkt_jax.training.config import apply_overrides, load_config

    try:
        apply_overrides(load_config("default"), ["train.compute_dtype=bfloat16"])
    except ValueError:
        return False
    return True


def describe_device(runner: Runner) -> dict[str, Any]:
    """JAX's device, asked in a subprocess (this process never takes GPU memory)."""
    code = (
        "import json, os, jax; d = jax.devices()[0]; print(json.dumps({'backend': jax.default_backend(), "
        "'device_kind': d.device_kind, 'device_count': jax.device_count(), 'jax': jax.__version__, "
        "'cpu_count': os.cpu_count()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=runner.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"backend": "unknown"}
    for package in ("torch", "torchvision", "pytest"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if info["backend"] == "cpu":
        from hkt_jax.runtime import cpu_info

        info["cpu"] = cpu_info.describe_cpu()
    return info


# -- report -------------------------------------------------------------------------------------------


def judge(key: str, value: Any, backend: str) -> str:
    target = TARGETS[key]
    if value is None:
        return "skipped"
    if not target.text:
        return "info"
    if not target.functional and backend != "gpu":
        return "n/a (CPU)"
    return "pass" if target.met(value) else "fail"


def table_rows(results: Results, backend: str) -> list[dict[str, Any]]:
    return [
        {
            "check": key,
            "value": results.checks[key],
            "target": TARGETS[key].text,
            "status": judge(key, results.checks[key], backend),
            "note": results.reasons.get(key, ""),
        }
        for key in TARGETS
    ]


def render(report: dict[str, Any]) -> str:
    title = (
        f"device check on {report['device']}{' (--quick)' if report['quick'] else ''}: "
        f"{report['wall_s']:.0f} s; targets are the H200 ones"
    )
    lines = [
        title,
        f"| {'check':28s} | {'value':>10s} | {'target':>8s} | {'status':9s} | note",
        f"|{'-' * 30}|{'-' * 12}|{'-' * 10}|{'-' * 11}|------",
    ]
    for row in report["table"]:
        value = row["value"]
        shown = "-" if value is None else str(value) if isinstance(value, (bool, int)) else f"{value:.3g}"
        lines.append(f"| {row['check']:28s} | {shown:>10s} | {row['target']:>8s} | {row['status']:9s} | {row['note']}")
    if report["details"].get("failed_tests"):
        lines.append("failed tests: " + ", ".join(report["details"]["failed_tests"]))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a few tests and quick benches (a 2-core CPU, ~2 min)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--workdir", type=Path, help="sub-commands' logs and outputs (default: a temporary folder)")
    parser.add_argument(
        "--budget_s", type=float, help="stop starting checks after this long (default 300, --quick 180)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset of: tests, smoke, bench_train, bench_ga, bench_raft, real_data",
    )
    args = parser.parse_args(argv)
    groups = {"tests", "smoke", "bench_train", "bench_ga", "bench_raft", "real_data"}
    args.only = set(filter(None, args.only.split(","))) or groups
    if args.only - groups:
        parser.error(f"unknown --only {sorted(args.only - groups)}; choose from {sorted(groups)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hkt_device_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_s or (180 if args.quick else 300)
    runner = Runner(workdir.resolve(), budget_s)
    results = Results()
    info = describe_device(runner)
    archive = paths.shared_data_dir() / CIFAR_ARCHIVE
    real_data = "real_data" in args.only and not args.quick and archive.exists()

    # The smoke first, before anything else has compiled (and maybe cached) programs it would reuse;
    # under --quick the two tests first (they compile nothing the smoke runs), so a slow CPU still runs them.
    if "smoke" in args.only and not args.quick:
        check_smoke(runner, results, args.quick)
    # Neither the tests nor the ResNet-110's accuracy are timed: they share the device, in parallel.
    tests_job = start_gpu_tests(runner, args.quick) if "tests" in args.only else None
    r110_job = start_resnet110(runner, archive) if real_data else None
    if "tests" in args.only:
        finish_gpu_tests(runner, tests_job, results)
    parent_110 = finish_resnet110(runner, r110_job, results) if real_data else None
    if "smoke" in args.only and args.quick:
        check_smoke(runner, results, args.quick)
    bench_f32 = None
    if "bench_train" in args.only:
        bench_f32 = check_bench_train(runner, results, args.quick, compute_dtype_available())
    if "bench_ga" in args.only:
        check_bench_ga(runner, results, args.quick)
    if "bench_raft" in args.only:
        check_bench_raft(runner, results, args.quick)
    if real_data:
        check_real_data_loop(runner, results, archive, parent_110, bench_f32)
    else:
        why = (
            "--quick: no real-data runs"
            if args.quick
            else f"the CIFAR-10 archive is not at {archive}"
            if not archive.exists()
            else "not in --only"
        )
        results.missing(["loop_vs_step_throughput", "resnet110_leaves_chance"], why)
    results.missing(TARGETS, "not in --only")

    backend = info.get("backend", "unknown")
    device = (
        f"{info.get('device_count', '?')} x {info.get('device_kind', '?')} ({backend}), JAX {info.get('jax')}, "
        f"torch {info.get('torch')}" + (f", CPU: {info['cpu']}" if "cpu" in info else "")
    )
    report = {
        "device": device,
        "device_info": info,
        "quick": args.quick,
        "budget_s": budget_s,
        "wall_s": round(time.monotonic() - started, 1),
        "checks": results.checks,
        "reasons": results.reasons,
        "table": table_rows(results, backend),
        "details": results.details,
        "runs": runner.records,
        "workdir": str(runner.workdir),
    }
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 1 if any(row["status"] == "fail" for row in report["table"]) else 0


if __name__ == "__main__":
    sys.exit(main())
