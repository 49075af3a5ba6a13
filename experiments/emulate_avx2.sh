#!/usr/bin/env bash
# Run a command as if on an AVX2 + FMA CPU without AVX-512 (AMD Zen 1-3, Intel client chips), on any
# AVX-512 x86 machine: XLA:CPU, the project's convolution kernels and PyTorch (ATen + oneDNN) are each
# capped at AVX2. Benchmarks print the caps with the CPU ("...; limited to XLA AVX2, kernels x86-64-v3, ...")
# and the convolution tuner decides again under them (its cache is keyed on the caps).
#
#     experiments/emulate_avx2.sh python -m experiments.bench_train --malloc_tuning
#
# A stand-in, not the real thing: caches, clocks and memory stay the host's.
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: experiments/emulate_avx2.sh COMMAND [ARGS...]" >&2
    exit 2
fi
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_max_isa=AVX2"
export HKT_JAX_KERNEL_MARCH=x86-64-v3
export ATEN_CPU_CAPABILITY=avx2
export ONEDNN_MAX_CPU_ISA=AVX2
exec "$@"
