"""Build and load ``conv3x3_cpu.cc``: one shared library per instruction-set target, cached by content hash.

The default target is ``-march=native`` (``$HKT_JAX_KERNEL_MARCH`` overrides it, e.g. ``x86-64-v3`` to run
the AVX2 + FMA tiles on an AVX-512 machine). Other targets can be loaded side by side: each registers its
FFI handlers under its own names, which is how the tests check every variant this CPU can execute.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from hkt_jax.runtime import cpu_info

SOURCE = Path(__file__).with_name("conv3x3_cpu.cc")
FWD_TARGET, DW_TARGET, FUSED_TARGET = "hkt_conv3x3_fwd", "hkt_conv3x3_weight_grad", "hkt_conv3x3_bias_act"


def cache_dir() -> Path:
    return Path(os.environ.get("HKT_JAX_KERNEL_CACHE", Path.home() / ".cache" / "hkt_jax" / "kernels"))


def default_march() -> str:
    return os.environ.get("HKT_JAX_KERNEL_MARCH", "native")


def runnable_marches() -> list[str]:
    """Build targets this CPU executes: native, plus the x86-64 levels below it (AVX2, SSE4.2)."""
    levels = [level for level in cpu_info.runnable_x86_levels() if level != "x86-64-v4"]
    return ["native", *reversed(levels)]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _flags(march: str) -> list[str]:
    return ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-pthread", "-isystem", jax.ffi.include_dir()]


def build_key(march: str | None = None) -> str:
    """Hash of everything the binary depends on: source, compiler and flags, jax version (its FFI headers), host CPU."""
    compiler, flags = _compiler() or "", _flags(march or default_march())
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([compiler, *flags, jax.__version__, platform.machine(), cpu_info.cpu_signature()]).encode())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        digest.update(version.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    return digest.hexdigest()[:16]


def build_library(march: str | None = None) -> Path:
    """Compile ``conv3x3_cpu.cc`` for ``march`` (once; cached by content hash). Raises RuntimeError on failure."""
    march = march or default_march()
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = cache_dir() / f"conv3x3_cpu-{build_key(march)}.so"
    if target.exists():
        return target
    print(
        f"hkt_jax: building the CPU convolution kernels for -march={march} (first use on this machine; "
        f"cached in {target.parent})",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            proc = subprocess.run(
                [compiler, *_flags(march), str(SOURCE), "-o", str(built)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed (-march={march}):\n{proc.stderr[-4000:]}")
            os.replace(built, target)  # atomic: concurrent builders (pytest-xdist workers) never see half a file
    except OSError as err:
        raise RuntimeError(f"cannot build {SOURCE.name} in {target.parent} (set HKT_JAX_KERNEL_CACHE): {err}") from err
    print(
        f"hkt_jax: built the CPU convolution kernels in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return target


@dataclasses.dataclass(frozen=True)
class KernelLibrary:
    """The FFI target names one build registered, and what it was built for."""

    march: str
    fwd: str
    weight_grad: str
    fused: str
    vector_floats: int  # 16: AVX-512 tiles, 8: AVX2, 4: SSE / NEON
    key: str  # build hash (part of the tuner's cache key)


def load(march: str | None = None) -> KernelLibrary:
    """Build (if needed), load and register the FFI targets for ``march``. Raises RuntimeError when impossible."""
    return _load(march or default_march())


@functools.cache
def _load(march: str) -> KernelLibrary:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        raise RuntimeError(
            f"the CPU conv kernels are built for Linux x86-64/aarch64, not {platform.system()} {platform.machine()}"
        )
    library = ctypes.cdll.LoadLibrary(str(build_library(march)))
    suffix = "" if march == default_march() else "_" + re.sub(r"\W", "_", march)
    names = [FWD_TARGET + suffix, DW_TARGET + suffix, FUSED_TARGET + suffix]
    for name, symbol in zip(names, (library.HktConv3x3Fwd, library.HktConv3x3WeightGrad, library.HktConv3x3BiasAct)):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return KernelLibrary(march, *names, vector_floats=int(library.HktConv3x3VectorFloats()), key=build_key(march))
