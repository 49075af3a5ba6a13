"""CPU convolution benchmark: ``python -m experiments.bench_conv [--batch 128] [--march M] [--json FILE]``.

Per 3x3 convolution of the CIFAR ResNets (RGB stem, 16/32/64 channels, stride 1 and 2) and per direction
(forward, input gradient, weight gradient, fused folded forward = conv + bias (+ residual) + ReLU), median
and best ms of this project's kernel (``hkt_jax.kernels``) and of XLA's convolution, timed in interleaved rounds on
the same random operands, and which one ``conv_impl="auto"`` picked (its own timing, cached per machine:
``hkt_jax/kernels/conv_tuning.py``). ``--march x86-64-v3`` (or ``$HKT_JAX_KERNEL_MARCH``) benchmarks the
AVX2 + FMA build on a CPU that has more; ``--train_step 20`` adds a ResNet-20 training step per
``conv_impl``; ``--variants`` the single-thread GFLOP/s of every build this CPU runs. Prints the CPU it
ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from hkt_jax.runtime import cpu_info
from hkt_jax.kernels import conv_tuning, cpu_conv

# (H=W, Ci, Co, stride) of CIFAR ResNet-20/56/110: the stem, the three stages, the two downsampling convs.
SHAPES = [(32, 3, 16, 1), (32, 16, 16, 1), (32, 16, 32, 2), (16, 32, 32, 1), (16, 32, 64, 2), (8, 64, 64, 1)]


def directions(ci: int, co: int, stride: int) -> list[str]:
    out = ["forward"] + (["input_grad"] if stride == 1 and ci % 16 == 0 else []) + ["weight_grad", "fused"]
    return out + (["fused_residual"] if stride == 1 and ci == co else [])


def time_pair(fns: dict, shapes, rounds: int) -> dict[str, float]:
    """Median and best ms of each candidate, interleaved rounds with alternating order, and the kernel / XLA
    ratio of the best times (what the tuner decides on: other processes only ever add time)."""
    operands = conv_tuning.random_operands(shapes, seed=1)
    compiled = {name: jax.jit(fn).lower(*operands).compile() for name, fn in fns.items()}
    for fn in compiled.values():
        jax.block_until_ready(fn(*operands))
    samples = {name: [] for name in compiled}
    names = list(compiled)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*operands))
            samples[name].append((time.perf_counter() - start) * 1e3)
    best = {f"{name}_best": min(v) for name, v in samples.items()}
    return {
        **{name: statistics.median(v) for name, v in samples.items()},
        **best,
        "ratio": best["kernel_best"] / best["xla_best"],
    }


def run(batch: int, rounds: int, march: str | None) -> dict:
    library = cpu_conv.load(march)
    policy = cpu_conv.Policy(tuned=True, march=march)
    rows = []
    for hw, ci, co, stride in SHAPES:
        x_shape, w_shape = (batch, hw, hw, ci), (3, 3, ci, co)
        for direction in directions(ci, co, stride):
            fns, shapes = cpu_conv.candidates(direction, x_shape, w_shape, stride, march)
            ms = time_pair(fns, shapes, rounds)
            auto = cpu_conv.kernel_chosen(policy, direction, x_shape, w_shape, stride)
            row = {
                "x": list(x_shape),
                "w": list(w_shape),
                "stride": stride,
                "direction": direction,
                "kernel_ms": round(ms["kernel"], 3),
                "xla_ms": round(ms["xla"], 3),
                "kernel_best_ms": round(ms["kernel_best"], 3),
                "xla_best_ms": round(ms["xla_best"], 3),
                "kernel_over_xla": round(ms["ratio"], 3),
                "auto": "kernel" if auto else "xla",
            }
            rows.append(row)
            print(
                f"{'x'.join(map(str, x_shape)):>16} {ci:>3}->{co:<3} s{stride} {direction:<15} "
                f"{row['kernel_ms']:9.2f} {row['xla_ms']:9.2f} {row['kernel_best_ms']:9.2f} "
                f"{row['xla_best_ms']:9.2f} "
                f"{row['kernel_over_xla']:7.2f}  {row['auto']}",
                flush=True,
            )
    return {
        "cpu": cpu_info.describe_cpu(),
        "cpu_flags_signature": cpu_info.cpu_signature(),
        "march": library.march,
        "vector_floats": library.vector_floats,
        "threads": conv_tuning._threads(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "batch": batch,
        "rounds": rounds,
        "tuner_margin": conv_tuning.MARGIN,
        "rows": rows,
        "kernel_best_ms_total": round(sum(r["kernel_best_ms"] for r in rows), 2),
        "xla_best_ms_total": round(sum(r["xla_best_ms"] for r in rows), 2),
        "auto_best_ms_total": round(
            sum(r["kernel_best_ms"] if r["auto"] == "kernel" else r["xla_best_ms"] for r in rows), 2
        ),
    }


def train_step_ms(depth: int, batch: int, rounds: int, impls=("auto", "xla", "cpu_kernel")) -> dict[str, dict]:
    """Median / best ms of a ResNet-``depth`` training step (cross-entropy, SGD, BatchNorm in training mode)
    per ``conv_impl``, same parameters and batch, timed in interleaved rounds."""
    import jax.numpy as jnp  # noqa: PLC0415
    from hkt_jax.models import CifarResNet  # noqa: PLC0415

    x, labels = conv_tuning.random_operands(((batch, 32, 32, 3),))[0], jnp.arange(batch) % 10
    variables = CifarResNet(depth=depth, conv_impl="xla").init(jax.random.key(0), x[:1])

    def make(impl):
        model = CifarResNet(depth=depth, conv_impl=impl)

        def loss(params, stats):
            logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), new

        @jax.jit
        def step(params, stats):
            (_, new), grads = jax.value_and_grad(loss, has_aux=True)(params, stats)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), new["batch_stats"]

        return step

    steps = {impl: make(impl) for impl in impls}
    args = (variables["params"], variables["batch_stats"])
    for step in steps.values():  # compile (and, for auto, tune) before timing
        jax.block_until_ready(step(*args))
    samples = {impl: [] for impl in steps}
    for i in range(rounds):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(steps[impl](*args))
            samples[impl].append((time.perf_counter() - start) * 1e3)
    return {
        impl: {"median_ms": round(statistics.median(v), 2), "best_ms": round(min(v), 2)} for impl, v in samples.items()
    }


def variants_gflops(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    """Single-threaded GFLOP/s of each build this CPU runs (native, x86-64-v3, -v2), forward and weight
    gradient per shape, from process CPU time (best of ``rounds``): what the tiles achieve, unaffected by
    waiting for a core on a busy machine."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from hkt_jax.kernels import build  # noqa: PLC0415

    libraries = {march: cpu_conv.load(march) for march in build.runnable_marches()}
    out: dict[str, dict[str, float]] = {march: {} for march in libraries}
    for hw, ci, co, stride in SHAPES:
        x_shape, w_shape = (batch, hw, hw, ci), (3, 3, ci, co)
        y_shape = cpu_conv._output_shape(x_shape, w_shape, stride)
        flops = 2 * 9 * float(np.prod(y_shape)) * ci
        for direction, result_shape, shapes in (
            ("forward", y_shape, (x_shape, w_shape)),
            ("weight_grad", w_shape, (x_shape, y_shape)),
        ):
            operands = conv_tuning.random_operands(shapes)
            result = jax.ShapeDtypeStruct(result_shape, jnp.float32)
            for march, lib in libraries.items():
                target = lib.fwd if direction == "forward" else lib.weight_grad
                fn = (
                    jax.jit(
                        lambda a, b, t=target: jax.ffi.ffi_call(t, result)(
                            a, b, stride=np.int32(stride), threads=np.int32(1)
                        )
                    )
                    .lower(*operands)
                    .compile()
                )
                times = []
                for _ in range(rounds):
                    start = time.process_time()
                    jax.block_until_ready(fn(*operands))
                    times.append(time.process_time() - start)
                out[march][f"{direction} {ci}->{co} s{stride}"] = round(flops / min(times) / 1e9, 1)
    for march, rows in out.items():
        print(
            f"# single-thread GFLOP/s, -march={march} ({libraries[march].vector_floats}-float vectors): "
            + ", ".join(f"{k} {v}" for k, v in rows.items())
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median)")
    parser.add_argument("--march", default=None, help="kernel build target (default $HKT_JAX_KERNEL_MARCH or native)")
    parser.add_argument(
        "--train_step",
        type=int,
        default=0,
        metavar="DEPTH",
        help="also time a ResNet-DEPTH training step (batch --batch): conv_impl auto, xla, cpu_kernel",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also: single-thread GFLOP/s of every build this CPU runs (batch 32, CPU time)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = parser.parse_args(argv)
    march = args.march or os.environ.get("HKT_JAX_KERNEL_MARCH") or "native"
    os.environ["HKT_JAX_KERNEL_MARCH"] = march  # the default build, which the models' convolutions use
    library = cpu_conv.load(march)
    print(
        f"# cpu: {cpu_info.describe_cpu()}, kernels -march={library.march} ({library.vector_floats}-float "
        f"vectors), {conv_tuning._threads()} threads, jax {jax.__version__}, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'input':>16} {'ch':>7} {'':2} {'direction':<15} {'kernel ms':>9} {'XLA ms':>9} {'k best':>9} "
        f"{'XLA best':>9} {'k/XLA':>7}  auto"
    )
    result = run(args.batch, args.rounds, march)
    total = {k: result[f"{k}_best_ms_total"] for k in ("kernel", "xla", "auto")}
    print(
        f"# sum of best ms: kernel {total['kernel']}, XLA {total['xla']}, auto's picks {total['auto']} "
        f"({total['auto'] / total['xla']:.2f}x XLA; k/XLA column: ratio of the best times)"
    )
    if args.train_step:
        step = train_step_ms(args.train_step, args.batch, args.rounds)
        result["train_step"] = {
            "depth": args.train_step,
            **step,
            "auto_over_xla_median": round(step["auto"]["median_ms"] / step["xla"]["median_ms"], 3),
            "auto_over_xla_best": round(step["auto"]["best_ms"] / step["xla"]["best_ms"], 3),
        }
        print(
            f"# ResNet-{args.train_step} train step, batch {args.batch}, median (best) ms: "
            + ", ".join(f"{impl} {t['median_ms']} ({t['best_ms']})" for impl, t in step.items())
            + f"; auto / xla = {result['train_step']['auto_over_xla_median']} (median), "
            f"{result['train_step']['auto_over_xla_best']} (best)"
        )
    if args.variants:
        result["variants_single_thread_gflops"] = variants_gflops(32, args.rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
