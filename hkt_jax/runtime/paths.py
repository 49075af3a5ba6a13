"""Where data lives outside the package: from the environment or the working directory, never the repo layout.

``HKT_SHARED_DATA`` names the folder of shared real data (default ``../shared/data``
relative to the working directory, where this project's machines keep it);
``HKT_JAX_DATA_CACHE`` the folder for extracted/decoded datasets (default
``~/.cache/hkt_jax/data``). Configs may name their own (``data.cache_dir``).
``HKT_JAX_COMPILE_CACHE`` the folder of JAX's persistent compilation cache that the
experiment commands turn on (default ``~/.cache/hkt_jax/jax_compilation_cache``;
``0`` turns it off).
"""

from __future__ import annotations

import os
from pathlib import Path

COMPILE_CACHE_ENV = "HKT_JAX_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def shared_data_dir() -> Path:
    return Path(os.environ.get("HKT_SHARED_DATA", Path("..") / "shared" / "data")).absolute()


def data_cache_dir() -> Path:
    return Path(os.environ.get("HKT_JAX_DATA_CACHE", Path.home() / ".cache" / "hkt_jax" / "data"))


def compile_cache_dir() -> Path | None:
    """Where the experiment commands keep compiled XLA programs; None when ``HKT_JAX_COMPILE_CACHE=0``."""
    value = os.environ.get(COMPILE_CACHE_ENV)
    if value is None or value == "":
        return Path.home() / ".cache" / "hkt_jax" / "jax_compilation_cache"
    return None if value.strip().lower() in _OFF else Path(value).expanduser()
