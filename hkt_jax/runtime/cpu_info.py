"""Which CPU this process runs on, in one line: benchmarks print it, the convolution tuner keys its cache on it.

Why: speed claims and kernel choices hold for one kind of CPU (the project's kernels were once tuned on
AVX-512 and were several times slower than XLA on AVX2-only CPUs), so every number says where it ran.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# Widest first: the first one present names the CPU's vector instruction set.
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")
# Instruction sets the compiler's x86-64 micro-architecture levels require (gcc -march=x86-64-vN).
X86_64_LEVELS = {
    "x86-64-v2": ("sse4_1", "sse4_2", "ssse3", "popcnt", "cx16"),
    "x86-64-v3": (
        "sse4_1",
        "sse4_2",
        "ssse3",
        "popcnt",
        "cx16",
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "movbe",
        "xsave",
        "abm",
    ),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def _first_processor(text: str) -> dict[str, str]:
    """``key: value`` lines of the first processor block of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.cache
def _cpuinfo_fields() -> dict[str, str]:
    try:
        return _first_processor(CPUINFO.read_text())
    except OSError:
        return {}


def cpu_model() -> str:
    """ "Intel(R) Xeon(R) Platinum 8488C", "AMD EPYC 7R13", ... (``platform.processor()`` without /proc/cpuinfo)."""
    fields = _cpuinfo_fields()
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or platform.processor()
    if model and fields.get("cpu family") and fields.get("model") and not any(c.isdigit() for c in model):
        model = f"{model} (family {fields['cpu family']} model {fields['model']})"  # e.g. "AMD EPYC" in a VM
    return model or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    fields = _cpuinfo_fields()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def vector_isa(flags: frozenset[str] | None = None) -> str:
    """ "avx512f", "avx2", ...: the widest vector instruction set present, else the machine name."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in VECTOR_ISAS if isa in flags), platform.machine() or "unknown")


def describe_cpu(
    model: str | None = None, flags: frozenset[str] | None = None, env: dict[str, str] | None = None
) -> str:
    """ "Intel(R) Xeon(R) Platinum 8488C (avx512f)", "AMD EPYC 7R13 (avx2, no avx512)",
    "AMD EPYC 9R45 (avx512f; limited to XLA AVX2, kernels x86-64-v3)" under instruction-set caps."""
    model = cpu_model() if model is None else model
    flags = cpu_flags() if flags is None else flags
    isa = vector_isa(flags)
    if isa in ("avx2", "avx"):
        isa += ", no avx512"
    limits = isa_limits(env)
    if limits:
        isa += "; limited to " + ", ".join(f"{who} {level}" for who, level in limits.items())
    return f"{model} ({isa})"


# Environment variables that cap the instruction set each library may use: with all three set
# (experiments/emulate_avx2.sh) an AVX-512 machine runs the AVX2 code paths of XLA, the kernels and PyTorch.
ISA_LIMIT_VARIABLES = {
    "kernels": "HKT_JAX_KERNEL_MARCH",
    "PyTorch": "ATEN_CPU_CAPABILITY",
    "oneDNN": "ONEDNN_MAX_CPU_ISA",
}


def xla_max_isa(env: dict[str, str] | None = None) -> str | None:
    """The ``--xla_cpu_max_isa`` XLA:CPU was started with (``XLA_FLAGS``), or None."""
    flags = (os.environ if env is None else env).get("XLA_FLAGS", "")
    found = re.findall(r"--xla_cpu_max_isa=(\S+)", flags)
    return found[-1] if found else None


def isa_limits(env: dict[str, str] | None = None) -> dict[str, str]:
    """{"XLA": "AVX2", "kernels": "x86-64-v3", ...}: the instruction-set caps in force (empty: none)."""
    env = os.environ if env is None else env
    xla = xla_max_isa(env)
    limits = {"XLA": xla} if xla else {}
    limits.update({who: env[name] for who, name in ISA_LIMIT_VARIABLES.items() if env.get(name)})
    return limits


def cpu_signature() -> str:
    """Short hash of the model and every flag: two CPUs that could run code differently get different ones."""
    text = "\n".join([cpu_model(), platform.machine(), *sorted(cpu_flags())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runnable_x86_levels(flags: frozenset[str] | None = None) -> list[str]:
    """The ``-march=x86-64-vN`` levels whose instructions this CPU has (empty off x86-64)."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    return [level for level, needed in X86_64_LEVELS.items() if set(needed) <= flags]
