"""Shared test helpers: where the real data lives, a skip when it is absent, an exported network's arrays.

The suite shares one persistent JAX compilation cache, a temporary folder made for the session (see
``_session_compile_cache``): tests never write into the user's ``~/.cache``, and a program that several tests,
xdist workers or subprocesses build alike compiles once. ``tests/test_startup.py`` tests the cache itself in
folders of its own. Two more settings cut the suite's CPU time without touching what the library does in a
user's run (``_cheaper_test_processes``).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from hkt_jax.runtime import compile_cache, malloc_tuning, paths

REPO_ROOT = Path(__file__).resolve().parents[1]

SESSION_CACHE_ENV = "HKT_JAX_TEST_COMPILE_CACHE"


def _session_compile_cache() -> None:
    """Point this process, the xdist workers and every subprocess at one compilation cache for the session.

    Why: most of the suite's CPU time was XLA compiling the same small programs again (each entry-point run,
    each worker, each subprocess). The first process of the session (xdist's controller, or the only one)
    makes the folder and removes it at exit; the workers and subprocesses inherit it through the environment.
    ``HKT_JAX_COMPILE_CACHE`` is what the experiment commands read, ``JAX_COMPILATION_CACHE_DIR`` what a
    plain ``python -c`` reads. A size bound makes JAX lock the folder around each read and write, so two
    processes never see half an entry. A hit runs the very program a compilation would build: numbers do
    not change (and no XLA optimisation flag is set here)."""
    directory = os.environ.get(SESSION_CACHE_ENV)
    if directory is None:
        directory = tempfile.mkdtemp(prefix="hkt_jax_test_compile_cache_")
        os.environ[SESSION_CACHE_ENV] = directory
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ[paths.COMPILE_CACHE_ENV] = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(compile_cache.MIN_COMPILE_TIME_S)
    if importlib.util.find_spec("filelock") is not None:  # JAX needs it for the size bound (and its lock)
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(64 << 30))
        jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    compile_cache.enable_compile_cache()  # this process imported JAX before the environment said so


_session_compile_cache()


def _cheaper_test_processes() -> None:
    """JAX's non-partitionable threefry and glibc's malloc kept in the process, here and in every child process.

    Why: most of the suite is XLA compiling small programs, and the partitionable threefry (JAX's default)
    makes each random draw of an initialisation a larger program: a RAFT-S ``init`` compiles in 6 s instead
    of 13 s on a 2-core Zen 4. The tests check shapes, learning, resumes and references with their own weights,
    none of which depends on which random bits an initialisation draws; the few that were tuned on the
    default's bits say so (``library_default_prng``). The glibc settings are what ``hkt_jax.runtime.malloc_tuning``
    does for training runs, as environment tunables so that xdist workers and subprocesses start with them
    (half the suite's system time was page faults). Together about 17 % of the suite's CPU time (measured
    with ``/usr/bin/time`` on the flow and RAFT test files: 458 -> 378 CPU-s). A developer's own
    ``JAX_THREEFRY_PARTITIONABLE`` or ``GLIBC_TUNABLES`` wins."""
    os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
    jax.config.update("jax_threefry_partitionable", os.environ["JAX_THREEFRY_PARTITIONABLE"] not in ("0", "false"))
    os.environ.setdefault("GLIBC_TUNABLES", malloc_tuning.glibc_tunables())


_cheaper_test_processes()


@pytest.fixture
def library_default_prng():
    """JAX's default (partitionable) threefry while the test runs, as in a user's run.

    For tests whose scenario was tuned on the random bits a user's run draws (the step at which a blown-up
    learning rate overflows); the rest of the suite runs the cheaper-to-compile one (see above)."""
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", True)
    yield
    jax.config.update("jax_threefry_partitionable", previous)


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
