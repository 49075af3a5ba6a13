"""K seeds at once on one machine: K processes vs one program that ``jax.vmap``s the training step.

    python -m experiments.bench_parallel [--ks 1,2,4] [--steps 20] [--json FILE]

Why: ``experiments.compare --parallel K`` could run K seeds of a grid as K processes (each an ordinary,
resumable run) or as one program stepping K seeds' states through ``jax.vmap`` of the library's step
(``hkt_jax.training.run.make_train_step``). This measures both on the devices present, with the smoke sizes
(ResNet-14 parent, frozen -> ResNet-8 child, 2HKT, batch 32 per seed): training images per second in
all, after compilation (median of ``--rounds`` alternating measurements). Processes are started together, compile, wait at a barrier, then time the same
number of steps; the vmapped program times K seeds per step. Writes a table and, with ``--json``, the
numbers (default ``experiments/results/bench_parallel_<platform>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.run import build_run, initial_state, make_train_step

OVERRIDES = ("method=hkt", "train.batch_size=32")


def build(seed: int, parent_ckpt: str):
    config = apply_overrides(load_config("smoke"), [*OVERRIDES, f"parent_ckpt={parent_ckpt}", f"train.seed={seed}"])
    run = build_run(config)
    return run, initial_state(run.init_variables, run.tx), next(run.datasets.train)


def time_steps(step, state, parent, batch, steps: int) -> tuple[float, object]:
    """Median seconds per step (each step blocked on), after one warm-up step (compilation)."""
    state, metrics = step(state, parent, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, parent, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return statistics.median(times), state


def single(seed: int, parent_ckpt: str, steps: int) -> None:
    """One process, one seed (as one run of the grid): compile, say ready, wait for "go", time, print JSON."""
    run, state, batch = build(seed, parent_ckpt)
    step = jax.jit(make_train_step(run.loss_fn, run.tx, run.schedule, run.task))
    state, metrics = step(state, run.parent_variables, batch)
    jax.block_until_ready(metrics)
    print("ready", flush=True)
    sys.stdin.readline()
    seconds, _ = time_steps(step, state, run.parent_variables, batch, steps)
    print(json.dumps({"seconds_per_step": seconds, "images": len(batch["label"])}), flush=True)


def processes(k: int, parent_ckpt: str, steps: int) -> float:
    """K processes at once: their img/s added up."""
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.bench_parallel",
                "--single",
                str(seed),
                "--parent_ckpt",
                parent_ckpt,
                "--steps",
                str(steps),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(k)
    ]
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark process failed before its first step")
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
    return sum(r["images"] / r["seconds_per_step"] for r in results)


def vmapped(k: int, parent_ckpt: str, steps: int) -> float:
    """One program: K seeds' states (each its own initialisation and batch) through vmap of the one step."""
    built = [build(seed, parent_ckpt) for seed in range(k)]
    run = built[0][0]
    states = jax.tree.map(lambda *xs: np.stack(xs), *[state for _, state, _ in built])
    batches = jax.tree.map(lambda *xs: np.stack(xs), *[batch for _, _, batch in built])
    step = jax.jit(jax.vmap(make_train_step(run.loss_fn, run.tx, run.schedule, run.task), in_axes=(0, None, 0)))
    seconds, _ = time_steps(step, states, run.parent_variables, batches, steps)
    return k * len(built[0][2]["label"]) / seconds


def make_parent(directory: Path) -> str:
    """A smoke parent export (2 steps of training: the weights do not matter for the timing)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cifar_hkt",
            "--config",
            "smoke",
            "--workdir",
            str(directory),
            "method=parent",
            "train.steps=2",
            "train.eval_every_steps=2",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return str(directory / "export" / "child")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench_parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ks", default="1,2,4", help="how many seeds at once, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="measure each K this many times, alternating the two ways (median kept): load "
        "from other processes then hits both alike",
    )
    parser.add_argument("--parent_ckpt", default=None, help="a smoke parent export (default: trained here, 2 steps)")
    parser.add_argument("--json", default=None, help="where to write the numbers")
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)  # one benchmark process
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.single is not None:
        single(args.single, args.parent_ckpt, args.steps)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        parent_ckpt = args.parent_ckpt or make_parent(Path(tmp) / "parent")
        rows = []
        for k in [int(k) for k in args.ks.split(",")]:
            rounds = [
                (processes(k, parent_ckpt, args.steps), vmapped(k, parent_ckpt, args.steps)) for _ in range(args.rounds)
            ]
            row = {
                "k": k,
                "processes_img_per_s": statistics.median(p for p, _ in rounds),
                "vmap_img_per_s": statistics.median(v for _, v in rounds),
                "rounds": rounds,
            }
            row["vmap_over_processes"] = row["vmap_img_per_s"] / row["processes_img_per_s"]
            rows.append(row)
            print(
                f"K={k}: processes {row['processes_img_per_s']:.0f} img/s, vmap {row['vmap_img_per_s']:.0f} img/s "
                f"(vmap / processes {row['vmap_over_processes']:.2f})",
                flush=True,
            )
    device = jax.devices()[0]
    result = {
        "device": f"{jax.device_count()} x {device.device_kind}",
        "platform": device.platform,
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "model": "smoke: ResNet-14 parent -> ResNet-8 child, 2HKT, batch 32 per seed",
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
    }
    print("| K | K processes img/s | one program, vmap over K img/s | vmap / processes |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['k']} | {row['processes_img_per_s']:.0f} | {row['vmap_img_per_s']:.0f} "
            f"| {row['vmap_over_processes']:.2f} |"
        )
    out = Path(args.json or f"experiments/results/bench_parallel_{device.platform}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
