"""Where data lives outside the package: from the environment or the working directory, never the repo layout.

``HKT_SHARED_DATA`` names the folder of shared real data (default ``../shared/data``
relative to the working directory, where this project's machines keep it);
``HKT_JAX_DATA_CACHE`` the folder for extracted/decoded datasets (default
``~/.cache/hkt_jax/data``). Configs may name their own (``data.cache_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    return Path(os.environ.get("HKT_SHARED_DATA", Path("..") / "shared" / "data")).absolute()


def data_cache_dir() -> Path:
    return Path(os.environ.get("HKT_JAX_DATA_CACHE", Path.home() / ".cache" / "hkt_jax" / "data"))
