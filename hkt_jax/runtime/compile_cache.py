"""JAX's persistent compilation cache, turned on by the experiment commands.

Why: a run's start-up is mostly XLA compiling the same programs again (on an H200
the smoke's train steps took 18-23 s each to compile). With the cache, a rerun,
a resumed run or another run of the same shapes loads the compiled train step,
eval step and initialisation from disk. The entry points call
``enable_compile_cache`` (the library itself never changes a process's JAX
settings at import).

Where: ``$HKT_JAX_COMPILE_CACHE``, else JAX's own ``$JAX_COMPILATION_CACHE_DIR``
when set, else ``~/.cache/hkt_jax/jax_compilation_cache``. Off with
``HKT_JAX_COMPILE_CACHE=0`` or the commands' ``--no_compile_cache``. The cache
only saves time: a hit runs the very program a compilation would build, so
results do not change. The CPU convolution kernels are FFI custom calls found by
name when a cached program loads (registered before any compilation), and their
per-convolution tuning runs at trace time, which a cache hit still does. Like
any JAX compilation cache it is trusted code: do not share the folder with users
you do not trust. It is never pruned (``JAX_COMPILATION_CACHE_MAX_SIZE=BYTES``
bounds it); deleting the folder is always safe.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from hkt_jax.runtime import paths

# Cache every program that took at least this long to compile. JAX's default (1 s) leaves out the
# eval step and the initialisation on a fast machine, and reading an entry back costs milliseconds.
MIN_COMPILE_TIME_S = 0.1


def compile_cache_dir(enabled: bool = True) -> Path | None:
    """The folder ``enable_compile_cache`` would use, or None when the cache is off."""
    if not enabled:
        return None
    if paths.COMPILE_CACHE_ENV not in os.environ and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return paths.compile_cache_dir()


def enable_compile_cache(enabled: bool = True) -> Path | None:
    """Point JAX's persistent compilation cache at ``compile_cache_dir()``; returns the folder (None: off).

    Call before the first compilation. A folder that cannot be created leaves the cache off with a warning:
    the run itself does not need it."""
    directory = compile_cache_dir(enabled)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        warnings.warn(f"hkt_jax: compilation cache off, cannot create {directory} ({error})", stacklevel=2)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size
    return directory


def current() -> Path | None:
    """The folder JAX's persistent compilation cache writes to in this process (None: off)."""
    if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
        return None
    return Path(jax.config.jax_compilation_cache_dir)


def describe(directory: Path | None) -> str:
    """The start-up line that says where compiled programs are kept."""
    if directory is None:
        return "compilation cache off (every run compiles its programs again)"
    return (
        f"compilation cache in {directory} (reruns skip compiling; off with --no_compile_cache "
        f"or {paths.COMPILE_CACHE_ENV}=0)"
    )
