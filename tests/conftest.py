"""Shared test helpers: where the real data lives, a skip when it is absent, an exported network's arrays.

The suite runs with the experiment commands' persistent compilation cache off (``HKT_JAX_COMPILE_CACHE=0``,
inherited by every subprocess): tests never write into the user's ``~/.cache``, and each test compiles what
it runs. ``tests/test_startup.py`` turns it on, in a temporary folder, where it tests the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hkt_jax.runtime import paths

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

    from hkt_jax.training import checkpoint

    variables, _ = checkpoint.load_model(directory)
    return [np.asarray(x) for x in jax.tree.leaves(variables)]


# -- accelerators ------------------------------------------------------------------------------------

GPU_SUBSET: dict[str, tuple[str, ...]] = {
    # module: test functions (empty: the whole module). ``python -m pytest -m gpu`` runs these; the
    # device check (experiments/device_check.py) runs them on the accelerator present (<= 2 min on one GPU).
    "test_ga.py": (),  # Genetic Attention: every implementation, values and gradients
    "test_hkt.py": (),  # the engine: Algorithm 1's streams, losses, frozen parent
    "test_etm.py": (),  # extractor / transfer
    "test_train_loop.py": ("test_run_writes_every_output",),  # one training loop per task
    "test_flow_task.py": ("test_smoke_trains_parent_then_hkt_child",),
    "test_seg_task.py": ("test_smoke_trains_parent_then_hkt_child",),
    "test_sharding.py": ("test_hlo_collective_parser", "test_fsdp_spec_picks_the_largest_divisible_axis"),  # one device
}
"""The ``gpu`` subset, in one place (so a test file needs no edit to join or leave it)."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = GPU_SUBSET.get(item.path.name)
        if names is not None and (not names or item.originalname in names):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def highest_matmul_precision():
    """float32 matmuls and convolutions at full float32 precision while the test runs.

    Tests that compare with float64 NumPy or with PyTorch use it: XLA's default on GPUs (TF32, a
    10-bit mantissa) and TPUs (bfloat16 passes) misses their 1e-5 tolerances, and on CPU it changes nothing."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
