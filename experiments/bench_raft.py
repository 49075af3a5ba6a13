"""RAFT / RAFT-S in JAX vs torchvision eager, same process, same weights:
``python -m experiments.bench_raft [--quick] [--repeats N] [--json F]``.

* inference: one frame pair, 32 iterations (default 440x1024, Sintel size after padding);
* training step: 12 iterations, batch 2 (default 368x496, RAFT's Sintel crop): sequence
  loss (gamma 0.8, L1 as princeton-vl's ``sequence_loss``), backward, AdamW update;
  BatchNorm in training mode on both sides.

JAX runs both correlation options (``all_pairs``, ``on_the_fly``; ``--corr_impls`` picks); torchvision
has the all-pairs volume only. torchvision runs on ``cuda`` when ``torch.cuda.is_available()`` (the
device JAX uses on a GPU machine), else on the CPU; its times include a ``torch.cuda.synchronize()``. Times are medians over rounds; each round runs every case once so
all of them see the same machine load. "temp MiB" is the compiled executable's temporary
memory (``jax.jit(...).lower(...).compile().memory_analysis()``). ``--quick``: small frames
and few iterations, to check that the script runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.runtime import cpu_info
from hkt_jax.convert import raft_from_torch
from hkt_jax.models import RAFT

CORR_IMPLS = ("all_pairs", "on_the_fly")
FULL = {"infer_shape": (440, 1024), "infer_iters": 32, "train_shape": (368, 496), "train_iters": 12, "batch": 2}
QUICK = {"infer_shape": (128, 192), "infer_iters": 4, "train_shape": (128, 128), "train_iters": 3, "batch": 2}
GAMMA, LEARNING_RATE = 0.8, 4e-4


def sequence_weights(iters: int) -> np.ndarray:
    return np.array([GAMMA ** (iters - i - 1) for i in range(iters)], np.float32)


def torch_model(torch, size: str):
    from torchvision.models.optical_flow import raft_large, raft_small

    torch.manual_seed(0)
    return (raft_small if size == "small" else raft_large)(weights=None)


def jax_inference(model: RAFT, iters: int):
    return jax.jit(lambda v, a, b: model.apply(v, a, b, iters=iters)[-1])


def jax_train_step(model: RAFT, iters: int, optimizer):
    weights = jnp.asarray(sequence_weights(iters))

    def loss_fn(params, batch_stats, image1, image2, target):
        variables = {"params": params, "batch_stats": batch_stats}
        flows, updates = model.apply(variables, image1, image2, iters=iters, train=True, mutable=["batch_stats"])
        per_iteration = jnp.abs(flows - target).mean(axis=(1, 2, 3, 4))
        return jnp.sum(weights * per_iteration), updates["batch_stats"]

    def step(params, batch_stats, opt_state, image1, image2, target):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, image1, image2, target
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def temp_mib(jitted, *args) -> float:
    analysis = jitted.lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_cases(config: dict, sizes: list[str], tasks: list[str], torch, corr_impls=CORR_IMPLS) -> list[dict]:
    """Each case: name, a zero-argument runner (blocks until done), and its temporary memory."""
    rng = np.random.default_rng(0)
    height, width = config["infer_shape"]
    frames = rng.uniform(0, 255, size=(2, 1, height, width, 3)).astype(np.float32)
    t_height, t_width = config["train_shape"]
    batch = config["batch"]
    train_frames = rng.uniform(0, 255, size=(2, batch, t_height, t_width, 3)).astype(np.float32)
    target = rng.normal(scale=5.0, size=(batch, t_height, t_width, 2)).astype(np.float32)
    cases = []
    for size in sizes:
        reference = torch_model(torch, size)
        variables = raft_from_torch(reference.state_dict())
        for impl in corr_impls:
            model = RAFT(small=size == "small", corr_impl=impl)  # unrolled iterations: what training runs
            infer = jax_inference(model.clone(unroll=1), config["infer_iters"])  # rolled, as estimate_flow
            args = jax.device_put((variables, frames[0], frames[1]))  # on the device once, not per call
            if "inference" in tasks:
                cases.append(
                    {
                        "task": "inference",
                        "size": size,
                        "impl": f"jax {impl}",
                        "temp_mib": temp_mib(infer, *args),
                        "run": lambda infer=infer, args=args: infer(*args).block_until_ready(),
                    }
                )
            if "train" not in tasks:
                continue
            optimizer = optax.adamw(LEARNING_RATE, weight_decay=1e-5)
            step = jax_train_step(model, config["train_iters"], optimizer)
            state = {
                "params": jax.tree.map(jnp.array, variables["params"]),
                "batch_stats": jax.tree.map(jnp.array, variables["batch_stats"]),
            }
            state["opt_state"] = optimizer.init(state["params"])
            data = (jnp.asarray(train_frames[0]), jnp.asarray(train_frames[1]), jnp.asarray(target))
            mib = temp_mib(step, state["params"], state["batch_stats"], state["opt_state"], *data)

            def train(step=step, state=state, data=data):
                state["params"], state["batch_stats"], state["opt_state"], loss = step(
                    state["params"], state["batch_stats"], state["opt_state"], *data
                )
                loss.block_until_ready()

            cases.append({"task": "train step", "size": size, "impl": f"jax {impl}", "temp_mib": mib, "run": train})
        cases += [
            case
            for case in torch_cases(torch, reference, size, config, frames, train_frames, target)
            if case["task"].split()[0] in tasks
        ]
    return cases


def torch_device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_cases(torch, reference, size: str, config: dict, frames, train_frames, target) -> list[dict]:
    device = torch_device(torch)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def to_torch(images):  # torchvision takes [-1, 1], channels-first
        return torch.from_numpy(2 * (images / 255.0) - 1).permute(0, 3, 1, 2).float().contiguous().to(device)

    image1, image2 = to_torch(frames[0]), to_torch(frames[1])
    reference = reference.to(device)

    def infer():
        reference.eval()
        with torch.no_grad():
            reference(image1, image2, num_flow_updates=config["infer_iters"])
        synchronize()

    train_model = torch_model(torch, size).to(device).train()
    optimizer = torch.optim.AdamW(train_model.parameters(), lr=LEARNING_RATE, weight_decay=1e-5)
    t_image1, t_image2 = to_torch(train_frames[0]), to_torch(train_frames[1])
    t_target = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous().to(device)
    weights = sequence_weights(config["train_iters"])

    def train():
        optimizer.zero_grad()
        flows = train_model(t_image1, t_image2, num_flow_updates=config["train_iters"])
        loss = sum(float(w) * (flow - t_target).abs().mean() for w, flow in zip(weights, flows))
        loss.backward()
        optimizer.step()
        synchronize()

    nan = float("nan")
    return [
        {"task": "inference", "size": size, "impl": "torchvision eager", "temp_mib": nan, "run": infer},
        {"task": "train step", "size": size, "impl": "torchvision eager", "temp_mib": nan, "run": train},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_raft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small frames, few iterations")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--sizes", default="large,small", help="comma-separated: large, small")
    parser.add_argument("--train_shape", help="HxW of the training crops instead of the default (e.g. 184x248)")
    parser.add_argument("--tasks", default="inference,train", help="comma-separated: inference, train")
    parser.add_argument("--corr_impls", default=",".join(CORR_IMPLS), help="comma-separated JAX correlation options")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    import torch  # the comparison needs torchvision; the JAX side does not

    config = dict(QUICK if args.quick else FULL)
    if args.train_shape:
        config["train_shape"] = tuple(int(v) for v in args.train_shape.lower().split("x"))
    sizes = [s for s in args.sizes.split(",") if s]
    flags = cpu_info.cpu_flags()
    device = jax.devices()[0]
    print(
        f"# CPU: {cpu_info.cpu_model()} (avx512f: {'yes' if 'avx512f' in flags else 'no'}; "
        f"{cpu_info.describe_cpu()}), {torch.get_num_threads()} torch threads"
    )
    print(
        f"# JAX {jax.__version__} on {device.platform} ({device.device_kind}); torch {torch.__version__} "
        f"on {torch_device(torch)}"
    )
    print(
        f"# inference: 1 pair {config['infer_shape'][0]}x{config['infer_shape'][1]}, {config['infer_iters']} iters; "
        f"train step: batch {config['batch']} {config['train_shape'][0]}x{config['train_shape'][1]}, "
        f"{config['train_iters']} iters; median of {args.repeats} rounds after a warm-up; "
        f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}"
    )
    corr_impls = tuple(i for i in args.corr_impls.split(",") if i)
    unknown = set(corr_impls) - set(CORR_IMPLS)
    if unknown:
        parser.error(f"unknown --corr_impls {sorted(unknown)}; choose from {list(CORR_IMPLS)}")
    cases = build_cases(config, sizes, [t for t in args.tasks.split(",") if t], torch, corr_impls)
    for case in cases:  # warm-up: compiles the JAX functions, fills torch's caches
        case["compile_s"] = timed(case["run"])
        case["times"] = []
        print(
            f"  warm-up {case['task']}, {case['size']}, {case['impl']}: {case['compile_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    for round_index in range(args.repeats):
        for case in cases:
            case["times"].append(timed(case["run"]))
        print(f"  round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for case in cases:
        torch_case = next(
            c
            for c in cases
            if c["task"] == case["task"] and c["size"] == case["size"] and c["impl"] == "torchvision eager"
        )
        median, torch_median = statistics.median(case["times"]), statistics.median(torch_case["times"])
        rows.append(
            {key: case[key] for key in ("task", "size", "impl", "temp_mib", "compile_s", "times")}
            | {"median_s": median, "torch_over_this": torch_median / median}
        )
    print("\n| task | model | implementation | median s | torchvision / this | temp MiB | first call s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        mib = "-" if np.isnan(row["temp_mib"]) else f"{row['temp_mib']:.0f}"
        model = "RAFT" if row["size"] == "large" else "RAFT-S"
        print(
            f"| {row['task']} | {model} | {row['impl']} | {row['median_s']:.2f} | {row['torch_over_this']:.2f}x | "
            f"{mib} | {row['compile_s']:.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "load_average": open("/proc/loadavg").read().split()[:3],
            "cpu": cpu_info.cpu_model(),
            "avx512f": "avx512f" in flags,
            "cpu_description": cpu_info.describe_cpu(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "platform": device.platform,
            "device_kind": device.device_kind,
            "torch_device": torch_device(torch),
            "config": config,
            "repeats": args.repeats,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
