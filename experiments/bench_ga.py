"""Benchmark the Genetic Attention implementations:
``python -m experiments.bench_ga [--quick] [--dtype float32|bfloat16] [--json F] [--plot F.png]``.

For each size (the CIFAR vectors, RAFT features, Sintel resolution, N=16,384)
and each implementation, ``auto`` included, it reports median forward and forward+backward time,
achieved GFLOP/s as a fraction of a large float32 matmul's (the roofline;
"bwd" is the backward alone, f+b minus forward medians), the compiled
executable's temporary memory (``memory_analysis``), and the error against
``plain`` and against a float64 NumPy reference on a subset of query rows.

Timing runs in rounds: each round calls the roofline matmul and every
implementation once, so all of them, the roofline included, see the same
machine load (this matters on a shared machine); medians are over rounds.

FLOP model (softmax): forward = 4 B N^2 C (Q K^T and alpha V); backward =
2 x forward (d alpha, d Q, d K and d V, one N^2 C matmul each); the softmax
exponentials and the recomputation of alpha inside the chunked backward are
not counted, so the GFLOP/s are useful work. Gate: 6 B N C forward, 2x that
backward (memory-bound; no roofline target).

The inputs have ``--dtype`` (the roofline matmul stays float32). The JSON's
``ga_auto_fb_ms_n16384_f32`` (or ``_bf16``) is ``auto``'s forward+backward median at
N=16,384, the number a device check compares across machines (null when that size
did not run, as in ``--quick``).

On CPU, XLA runs plain's whole forward attention as one YNNPACK library
fusion whose internal N x N buffer ``memory_analysis`` does not count: its
forward temp reads ~0 although the process grows by B*N*N*4 bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.runtime import cpu_info
from hkt_jax.engine import ga

# name: (batch, spatial, channels); spatial () means pooled vectors (gate only).
FULL_CASES = {
    "cifar_vectors": (128, (), 64),
    "raft_features": (8, (46, 62), 256),
    "sintel_1/8": (1, (55, 128), 256),
    "n16384": (1, (128, 128), 128),
}
QUICK_CASES = {
    "cifar_vectors": (128, (), 64),
    "raft_small": (2, (23, 31), 128),
    "n2048": (1, (32, 64), 128),
    "n4096": (1, (64, 64), 64),
}
SOFTMAX_IMPLS = ("plain", "chunked", "dot_product_attention", "auto")
DTYPES = {"float32": (jnp.float32, "f32"), "bfloat16": (jnp.bfloat16, "bf16")}
REFERENCE_ROWS = 256
ROUND_BUDGET_S = 60.0
"""After 3 rounds, no new round starts once a size has spent this long timing."""


def _reference_rows(child, parent, mode, rows):
    """float64 NumPy GA for the given query rows (tokens flattened), (B, len(rows), C)."""
    b, c = child.shape[0], child.shape[-1]
    x = np.asarray(child, np.float64).reshape(b, -1, c)
    t = np.asarray(parent, np.float64).reshape(b, -1, c)
    if mode == "gate":
        gate = 1.0 / (1.0 + np.exp(-np.sum(x * t, -1, keepdims=True) / math.sqrt(c)))
        return ((1.0 - gate) * (t - x))[:, rows]
    logits = x[:, rows] @ t.transpose(0, 2, 1) / math.sqrt(c)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return t[:, rows] - weights @ t


def _rel_err(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _timed_rounds(calls: dict, reps: int) -> dict:
    """{name: [seconds per round]}: every call once per round, after one warm-up call each."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    rounds, spent = 0, 0.0
    while rounds < reps and (rounds < 3 or spent < ROUND_BUDGET_S):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        rounds += 1
    return times


def bench_case(case, batch, spatial, channels, *, reps, chunk_sizes, roofline_size, rng, dtype) -> list[dict]:
    """Every mode/implementation on one size, timed in interleaved rounds with the roofline matmul."""
    shape, tokens = (batch, *spatial, channels), math.prod(spatial)
    child, parent, cotangent = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    reference_rows = rng.choice(tokens, size=min(tokens, REFERENCE_ROWS), replace=False)
    runs = [("gate", "auto", None)]
    if spatial:
        runs += [("softmax", impl, None) for impl in SOFTMAX_IMPLS]
        runs += [("softmax", "chunked", size) for size in chunk_sizes]

    square = jax.random.normal(jax.random.PRNGKey(0), (roofline_size,) * 2, jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(square, square).compile()
    calls = {"roofline": lambda: matmul(square, square)}
    rows = []
    for mode, impl, chunk_size in runs:
        resolved, chunk_rows = None, None
        if mode == "softmax":
            try:
                resolved, chunk_rows = ga.resolve_impl(impl, shape, dtype, chunk_size=chunk_size)
            except ValueError as refusal:  # cuDNN on a length it does not take: no row, the reason printed
                print(f"# {case}: skip impl={impl}: {refusal}")
                continue
        forward = jax.jit(functools.partial(ga.genetic_attention, mode=mode, impl=impl, chunk_size=chunk_size))
        forward_backward = jax.jit(lambda x, t, g, forward=forward: jax.vjp(forward, x, t)[1](g))
        compiled_fwd = forward.lower(child, parent).compile()
        compiled_fb = forward_backward.lower(child, parent, cotangent).compile()
        key = len(rows)
        calls[(key, "fwd")] = functools.partial(compiled_fwd, child, parent)
        calls[(key, "fwd_bwd")] = functools.partial(compiled_fb, child, parent, cotangent)
        rows.append(
            {
                "case": case,
                "batch": batch,
                "tokens": tokens,
                "channels": channels,
                "mode": mode,
                "impl": impl if mode == "softmax" else "-",
                "chunk_size": chunk_size,
                "dtype": jnp.dtype(dtype).name,
                "resolved_impl": resolved,
                "chunk_rows": chunk_rows,
                "flops_fwd": 6 * batch * tokens * channels if mode == "gate" else 4 * batch * tokens**2 * channels,
                "fwd_temp_mib": compiled_fwd.memory_analysis().temp_size_in_bytes / 2**20,
                "fwd_bwd_temp_mib": compiled_fb.memory_analysis().temp_size_in_bytes / 2**20,
            }
        )

    times = _timed_rounds(calls, reps)
    roofline = 2 * roofline_size**3 / statistics.median(times["roofline"]) / 1e9
    roofline_best = 2 * roofline_size**3 / min(times["roofline"]) / 1e9
    plain_out = None
    for key, row in enumerate(rows):
        for part, flops in (("fwd", row["flops_fwd"]), ("fwd_bwd", 3 * row["flops_fwd"])):
            median_s, best_s = statistics.median(times[(key, part)]), min(times[(key, part)])
            row[f"{part}_ms"], row[f"{part}_min_ms"] = median_s * 1e3, best_s * 1e3
            row[f"{part}_gflops"] = flops / median_s / 1e9
            row[f"{part}_roofline_frac"] = row[f"{part}_gflops"] / roofline
            row[f"{part}_best_roofline_frac"] = flops / best_s / 1e9 / roofline_best
        backward_s = (row["fwd_bwd_ms"] - row["fwd_ms"]) / 1e3
        row["bwd_roofline_frac"] = 2 * row["flops_fwd"] / backward_s / 1e9 / roofline if backward_s > 0 else None
        out = np.asarray(calls[(key, "fwd")](), np.float64)
        reference = _reference_rows(child, parent, row["mode"], reference_rows)
        row["err_vs_f64"] = _rel_err(out.reshape(batch, tokens, channels)[:, reference_rows], reference)
        row["err_vs_plain"] = None if plain_out is None or row["mode"] == "gate" else _rel_err(out, plain_out)
        plain_out = out if row["impl"] == "plain" else plain_out
        row.update(roofline_gflops=roofline, roofline_best_gflops=roofline_best, rounds=len(times["roofline"]))
    return rows


HEADER = (
    f"{'case':14s} {'mode':7s} {'impl':21s} {'rows':>5s} | {'fwd ms':>8s} {'GF/s':>6s} {'roof':>5s} | "
    f"{'f+b ms':>8s} {'GF/s':>6s} {'roof':>5s} {'bwd':>5s} | {'temp MiB fwd/f+b':>17s} | {'err/plain':>9s} {'err/f64':>8s}"
)


def format_row(row) -> str:
    err_plain = "-" if row["err_vs_plain"] is None else f"{row['err_vs_plain']:.1e}"
    impl = (
        row["impl"] if row["impl"] != "auto" else "auto=" + row["resolved_impl"].replace("dot_product_attention", "dpa")
    )
    bwd = "-" if row["bwd_roofline_frac"] is None else f"{row['bwd_roofline_frac']:.0%}"
    return (
        f"{row['case']:14s} {row['mode']:7s} {impl:21s} {row['chunk_rows'] or '-':>5} | "
        f"{row['fwd_ms']:8.1f} {row['fwd_gflops']:6.1f} {row['fwd_roofline_frac']:5.0%} | "
        f"{row['fwd_bwd_ms']:8.1f} {row['fwd_bwd_gflops']:6.1f} {row['fwd_bwd_roofline_frac']:5.0%} {bwd:>5s} | "
        f"{row['fwd_temp_mib']:8.1f}/{row['fwd_bwd_temp_mib']:8.1f} | {err_plain:>9s} {row['err_vs_f64']:8.1e}"
    )


def run(cases: dict, *, reps: int, chunk_sizes: tuple[int, ...], roofline_size: int, dtype: str = "float32") -> dict:
    device = jax.devices()[0]
    array_dtype, tag = DTYPES[dtype]
    device_memory, compute_capability = ga.device_facts(device.platform)
    report = {
        "platform": device.platform,
        "cpu": cpu_info.describe_cpu(),
        "device_kind": device.device_kind,
        "device_memory_bytes": device_memory,
        "compute_capability": compute_capability,
        "jax_version": jax.__version__,
        "dtype": dtype,
        "reps": reps,
        "roofline_matmul_size": roofline_size,
        "auto_choice": {},
        "rows": [],
    }
    print(
        f"# device: {device.device_kind} (platform {device.platform}), cpu {cpu_info.describe_cpu()}, jax {jax.__version__}, "
        f"{dtype} inputs, median of <= {reps} interleaved rounds"
    )
    print(HEADER)
    rng = np.random.default_rng(0)
    for case, (batch, spatial, channels) in cases.items():
        rows = bench_case(
            case,
            batch,
            spatial,
            channels,
            reps=reps,
            chunk_sizes=chunk_sizes,
            roofline_size=roofline_size,
            rng=rng,
            dtype=array_dtype,
        )
        print(
            f"# {case}: B={batch} N={math.prod(spatial)} C={channels}, roofline {rows[0]['roofline_gflops']:.1f} "
            f"GFLOP/s (median of {rows[0]['rounds']} rounds; best {rows[0]['roofline_best_gflops']:.1f})"
        )
        for row in rows:
            print(format_row(row), flush=True)
        if spatial:
            impl, chunk_rows = ga.resolve_impl("auto", (batch, *spatial, channels), array_dtype)
            report["auto_choice"][case] = {"impl": impl, "chunk_rows": chunk_rows}
            print(f"#   impl='auto' picks {impl}" + (f" with {chunk_rows} rows per chunk" if chunk_rows else ""))
        report["rows"] += rows
    auto_n16384 = [r for r in report["rows"] if r["case"] == "n16384" and r["impl"] == "auto"]
    report[f"ga_auto_fb_ms_n16384_{tag}"] = auto_n16384[0]["fwd_bwd_ms"] if auto_n16384 else None
    if device.platform == "cpu":
        print("# cpu: plain's forward temp omits its N*N weights (inside one YNNPACK fusion; see module docstring)")
    return report


def _label(row) -> str:
    return row["impl"] + (f" chunk_size={row['chunk_size']}" if row["chunk_size"] else "")


def plot(report: dict, out: Path) -> Path:
    from experiments.plot_metrics import plt, save_figure  # plot_metrics selects the Agg backend first

    rows = [r for r in report["rows"] if r["mode"] == "softmax"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    metrics = (
        ("fwd_ms", "forward ms (median)", True),
        ("fwd_bwd_ms", "forward+backward ms (median)", True),
        ("fwd_bwd_roofline_frac", "f+b fraction of matmul roofline", False),
        ("fwd_bwd_temp_mib", "f+b compiled temp MiB", True),
    )
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
    width = 0.8 / len(labels)
    for ax, (key, title, log) in zip(axes, metrics):
        for i, label in enumerate(labels):
            values = [
                next((r[key] for r in rows if r["case"] == case and _label(r) == label), np.nan) for case in cases
            ]
            ax.bar(np.arange(len(cases)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(cases)) + width * (len(labels) - 1) / 2, cases)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(labels), fontsize="small")
    fig.suptitle(f"Genetic Attention, {report['device_kind']} ({report['platform']})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench_ga", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 rounds, well under a minute on CPU")
    parser.add_argument("--reps", type=int, help="timed rounds per size (default 7, --quick 2)")
    parser.add_argument("--chunk-sizes", default="", help="comma-separated explicit chunk sizes to add as extra rows")
    parser.add_argument("--roofline-size", type=int, help="matmul size for the roofline (default 4096, --quick 2048)")
    parser.add_argument("--cases", default="", help="comma-separated subset of the size names to run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input dtype (default float32)")
    parser.add_argument("--json", type=Path, help="write the full report as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart (time, roofline fraction, memory) here")
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.cases:
        unknown = set(args.cases.split(",")) - set(cases)
        if unknown:
            parser.error(f"unknown --cases {sorted(unknown)}; choose from {sorted(cases)}")
        cases = {name: cases[name] for name in args.cases.split(",")}
    reps = args.reps or (2 if args.quick else 7)
    chunk_sizes = tuple(int(s) for s in args.chunk_sizes.split(",") if s)
    roofline_size = args.roofline_size or (2048 if args.quick else 4096)
    report = run(cases, reps=reps, chunk_sizes=chunk_sizes, roofline_size=roofline_size, dtype=args.dtype)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"# wrote {args.json}")
    if args.plot:
        print(f"# wrote {plot(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
