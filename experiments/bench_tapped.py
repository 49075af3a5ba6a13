"""Tapped vs hand-staged: ``python -m experiments.bench_tapped [--quick] [--json FILE] [...]``.

Times the compiled HKT train step (three streams, three losses, value_and_grad,
SGD with momentum) twice on the same batch: with hand-staged CifarResNets
(``stage_split="groups"``) and with the same networks wrapped in
``hkt_jax.models.Tapped`` at their group outputs (``layerG_{n-1}``). Both
programs run in interleaved rounds (median ms), so load from other processes
hits them alike; the convolution count of each compiled step is printed too
(equal when XLA removed the dead work the tapped stages trace).

Default: ResNet-110 parent -> ResNet-20 child, batch 128, every group boundary
in both directions, gate GA (per spatial token: it keeps the step dominated by
the networks, which is what differs), lambda 0.6, alphas 0.25/0.5/0.25, parent
unfolded, ``--conv_impl xla`` on both sides (the CPU kernels go through custom
calls that the HLO convolution count would not see). ``--quick``: ResNet-20 ->
ResNet-8, batch 32.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.tasks import Classification
from hkt_jax.engine.hkt import HKT, HKTConfig
from hkt_jax.models import CifarResNet, Tapped, tapped_boundaries

GROUP_NAMES = ("group1", "group2", "group3", "head")
NUM_CLASSES = 10


def describe_cpu() -> str:
    try:
        from hkt_jax.runtime.cpu_info import describe_cpu as describe

        return describe()
    except ImportError:  # fall back to /proc/cpuinfo's first model name and flags
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = fields.get("flags", "").split()
        isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), platform.machine())
        return f"{fields.get('model name') or platform.processor()} ({isa})"


def group_taps(depth: int) -> tuple[str, ...]:
    """The last block of each residual group: where the hand-staged ``groups`` split cuts."""
    last = (depth - 2) // 6 - 1
    return tuple(f"layer{g}_{last}" for g in (1, 2, 3))


def parent_variables(parent: CifarResNet, seed: int) -> Any:
    variables = parent.init(jax.random.key(seed), jnp.zeros((2, 32, 32, 3), jnp.float32))
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32), variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}


def build_step(args, tapped: bool, parent_vars: Any, batch: dict[str, jax.Array]) -> tuple[Callable, str, dict]:
    """(one HKT train step on ``batch``, its compiled HLO text, XLA's cost analysis of it)."""

    def network(depth: int):
        if tapped:
            return Tapped(
                CifarResNet(depth=depth, num_classes=NUM_CLASSES, conv_impl=args.conv_impl),
                taps=group_taps(depth),
                names=GROUP_NAMES,
            )
        return CifarResNet(depth=depth, num_classes=NUM_CLASSES, stage_split="groups", conv_impl=args.conv_impl)

    child, parent = network(args.child_depth), network(args.parent_depth)
    config = HKTConfig(lam=0.6, mode=args.mode, alphas=(0.25, 0.5, 0.25), inherit_loss="mae")
    if tapped:
        config = HKTConfig(
            lam=0.6,
            mode=args.mode,
            alphas=(0.25, 0.5, 0.25),
            inherit_loss="mae",
            boundaries=tapped_boundaries(child, parent),
        )
    engine = HKT(child, parent, config, task=Classification())
    variables = engine.init(jax.random.key(2), batch["image"][:2], parent_vars)
    tx = optax.sgd(0.01, momentum=0.9)

    def train_step(state, parent_variables, batch):
        params, batch_stats, opt_state = state
        (loss, aux), grads = jax.value_and_grad(engine.loss, has_aux=True)(params, batch_stats, parent_variables, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), aux["batch_stats"], opt_state), loss

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, parent_vars, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], loss = compiled(holder["state"], parent_vars, batch)
        return loss

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return run, compiled.as_text(), {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}


def opcode_histogram(hlo: str) -> collections.Counter:
    """How many instructions of each opcode a compiled HLO module holds (fusions' bodies included)."""
    return collections.Counter(re.findall(r"^\s*(?:ROOT )?%?[\w.\-]+ = .*? ([a-z][a-z0-9\-]*)\(", hlo, flags=re.M))


def time_interleaved(programs: dict[str, Callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in programs}
    for r in range(warmup + rounds):
        for name, run in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent_depth", type=int, default=110)
    parser.add_argument("--child_depth", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", default="gate", choices=("gate", "softmax", "auto"))
    parser.add_argument("--conv_impl", default="xla", choices=("xla", "auto", "cpu_kernel"))
    parser.add_argument("--quick", action="store_true", help="ResNet-20 -> ResNet-8, batch 32, 3 rounds")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.parent_depth, args.child_depth, args.batch_size, args.rounds = 20, 8, 32, 3

    cpu = describe_cpu()
    print(f"CPU: {cpu}; jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].platform}")
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(args.batch_size, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, args.batch_size), jnp.int32),
    }
    parent_vars = parent_variables(CifarResNet(depth=args.parent_depth, num_classes=NUM_CLASSES), seed=1)
    programs, histograms, costs, compile_s = {}, {}, {}, {}
    for name, tapped in (("staged", False), ("tapped", True)):
        start = time.perf_counter()
        programs[name], hlo, costs[name] = build_step(args, tapped, parent_vars, batch)
        compile_s[name] = time.perf_counter() - start
        histograms[name] = opcode_histogram(hlo)
    convolutions = {name: h["convolution"] for name, h in histograms.items()}
    instructions = {name: sum(h.values()) for name, h in histograms.items()}
    same_ops = histograms["staged"] == histograms["tapped"]
    times = time_interleaved(programs, args.rounds, args.warmup)
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    ratio = medians["tapped"] / medians["staged"]
    paired = statistics.median(t / s for t, s in zip(times["tapped"], times["staged"]))
    best = min(times["tapped"]) / min(times["staged"])

    print(
        f"HKT train step, ResNet-{args.parent_depth} -> ResNet-{args.child_depth}, batch {args.batch_size}, "
        f"GA {args.mode}, conv_impl {args.conv_impl}, {args.rounds} interleaved rounds"
    )
    print(
        f"{'model':<8} {'median ms':>10} {'min ms':>8} {'img/s':>7} {'convolutions':>13} "
        f"{'HLO instructions':>17} {'build+compile s':>16}"
    )
    for name in programs:
        print(
            f"{name:<8} {medians[name]:>10.1f} {min(times[name]):>8.1f} "
            f"{args.batch_size / medians[name] * 1e3:>7.1f} {convolutions[name]:>13d} "
            f"{instructions[name]:>17d} {compile_s[name]:>16.1f}"
        )
    print(
        f"tapped / staged: {ratio:.3f} (ratio of medians), {paired:.3f} (median of per-round ratios), "
        f"{best:.3f} (ratio of minima)"
    )
    print(
        f"compiled steps: same opcode histogram {same_ops}; XLA cost analysis staged {costs['staged']}, "
        f"tapped {costs['tapped']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "cpu": cpu,
                    "jax_version": jax.__version__,
                    "platform": platform.platform(),
                    "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
                    "parent_depth": args.parent_depth,
                    "child_depth": args.child_depth,
                    "batch_size": args.batch_size,
                    "mode": args.mode,
                    "conv_impl": args.conv_impl,
                    "rounds": args.rounds,
                    "warmup": args.warmup,
                    "median_ms": medians,
                    "all_ms": {k: [round(t, 2) for t in v] for k, v in times.items()},
                    "convolutions": convolutions,
                    "hlo_instructions": instructions,
                    "build_and_compile_s": compile_s,
                    "tapped_over_staged": ratio,
                    "tapped_over_staged_paired": paired,
                    "tapped_over_staged_min": best,
                    "same_opcode_histogram": same_ops,
                    "cost_analysis": costs,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
