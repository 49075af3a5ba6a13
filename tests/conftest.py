"""Shared test helpers: where the real data lives, a skip when it is absent, an exported network's arrays.

The suite runs with the experiment commands' persistent compilation cache off (``HKT_JAX_COMPILE_CACHE=0``,
inherited by every subprocess): tests never write into the user's ``~/.cache``, and each test compiles what
it runs. ``tests/test_startup.py`` turns it on, in a temporary folder, where it tests the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hkt_jax import paths

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ[paths.COMPILE_CACHE_ENV] = "0"


def shared_data_dir() -> Path:
    """``$HKT_SHARED_DATA``, else ``<repo>/../shared/data`` (where this workplace keeps it)."""
    if "HKT_SHARED_DATA" in os.environ:
        return paths.shared_data_dir()
    return REPO_ROOT.parent / "shared" / "data"  # pytest may run from anywhere; the library's default is cwd-based


def require_shared(*relative: str) -> Path:
    """The shared-data path, or skip the test saying exactly what is missing."""
    path = shared_data_dir().joinpath(*relative)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set HKT_SHARED_DATA to the shared data folder)")
    return path


def exported_leaves(directory) -> list:
    """Every array of an exported network, in tree order (to compare two runs' exports exactly)."""
    import jax
    import numpy as np

    from hkt_jax import checkpoint

    variables, _ = checkpoint.load_model(directory)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]
