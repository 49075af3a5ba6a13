"""Start-up: the persistent compilation cache (a warm run compiles nothing and computes the same numbers),
initialisation inside jit (bit-identical to the eager one), and data.source=auto without tensorflow-datasets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.runtime import compile_cache, paths
from hkt_jax.training import experiment_cli, factories
from hkt_jax.training.config import HKTSettings, OptimConfig
from hkt_jax.data import DataConfig
from hkt_jax.data.image_folder import shared_cifar10_archive
from hkt_jax.data.pipeline import resolve_auto_source
from hkt_jax.data.sources import TFDSNotInstalled, load_tfds
from hkt_jax.kernels import cpu_conv
from hkt_jax.training.methods import trainable_variables
from hkt_jax.models import ToyStagedNet
from hkt_jax.models.cifar_resnet import conv_init
from hkt_jax.training.optim import make_optimizer, make_schedule
from hkt_jax.tasks import Classification
from tests.conftest import REPO_ROOT

# ---------------------------------------------------------------- compilation cache


def test_compile_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.COMPILE_CACHE_ENV)
    assert paths.compile_cache_dir() == Path.home() / ".cache" / "hkt_jax" / "jax_compilation_cache"
    monkeypatch.setenv(paths.COMPILE_CACHE_ENV, str(tmp_path / "cc"))
    assert compile_cache.compile_cache_dir() == tmp_path / "cc"
    assert compile_cache.compile_cache_dir(enabled=False) is None  # --no_compile_cache
    for off in ("0", "off", "false"):
        monkeypatch.setenv(paths.COMPILE_CACHE_ENV, off)
        assert paths.compile_cache_dir() is None and compile_cache.compile_cache_dir() is None
    assert "off" in compile_cache.describe(None) and str(tmp_path) in compile_cache.describe(tmp_path)


def _smoke(workdir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """A tiny child-only run (no parent), with JAX logging which programs it compiled or loaded."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.cifar_hkt",
        "--config",
        "smoke",
        "--workdir",
        str(workdir),
        "method=child",
        "child.depth=8",
        "data.synthetic_train_size=64",
        "data.synthetic_test_size=32",
        "data.validation_size=32",
        "train.batch_size=16",
        "train.steps=2",
        "train.log_every_steps=1",
        "train.eval_every_steps=2",
        "train.checkpoint_every_steps=2",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), paths.COMPILE_CACHE_ENV: str(cache), "JAX_LOG_COMPILES": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _numbers(workdir: Path):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if k not in ("img_per_s", "time")} for row in rows]
    summary = json.loads((workdir / "summary.json").read_text())
    return rows, summary["final_test"], summary.get("final_validation_accuracy")


def _entries(cache: Path, programs: tuple[str, ...]) -> list[str]:
    """The cache's entries of the named programs (single operations near the 0.1 s threshold may or may not
    be written, depending on how busy the machine is)."""
    return sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache") and p.name.startswith(programs))


def test_a_second_run_loads_its_programs_from_the_cache_and_computes_the_same(tmp_path):
    # The CPU kernels are FFI custom calls: a cached program must find them and give the same numbers.
    conv = "cpu_kernel" if cpu_conv.kernels_available() else "xla"
    cache = tmp_path / "cache"
    cold = _smoke(tmp_path / "cold", cache, f"child.conv_impl={conv}")
    assert f"compilation cache in {cache}" in cold.stdout
    programs = ("jit_train_step", "jit_eval_step", "jit_init")
    entries = _entries(cache, programs)
    assert all(any(name.startswith(program) for name in entries) for program in programs), entries

    warm = _smoke(tmp_path / "warm", cache, f"child.conv_impl={conv}")
    for program in programs:
        assert f"Persistent compilation cache hit for '{program}'" in warm.stderr, program
    assert _entries(cache, programs) == entries  # loaded, not compiled again
    assert _numbers(tmp_path / "warm") == _numbers(tmp_path / "cold")


def test_no_compile_cache_flag_turns_the_cache_off(tmp_path, monkeypatch):
    from experiments import cifar_hkt

    assert experiment_cli.parse_args(cifar_hkt.COMMAND, ["--no_compile_cache", "train.steps=1"]).no_compile_cache
    assert not experiment_cli.parse_args(cifar_hkt.COMMAND, ["train.steps=1"]).no_compile_cache
    monkeypatch.setenv(paths.COMPILE_CACHE_ENV, str(tmp_path / "cache"))
    assert compile_cache.enable_compile_cache(enabled=False) is None
    assert not (tmp_path / "cache").exists() and not jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", True)  # JAX's default (no folder: nothing cached)


# ---------------------------------------------------------------- initialisation inside jit


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), (jax.tree_util.keystr(path), np.abs(x - y).max())


class KaimingNet(nn.Module):
    """The CIFAR ResNets' initialiser at toy size: with XLA's algebraic simplifier, jit changes some of its
    values by one ulp (a third of a ResNet-8's weights)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), kernel_init=conv_init)(x)
        return nn.Dense(10, kernel_init=conv_init)(x.mean((1, 2)))


def test_jitted_initialisation_equals_the_eager_one_bit_for_bit():
    """A seed gives the network it gave before initialisation moved into jit."""
    task, rng = Classification(), jax.random.key(7)
    x = jnp.zeros((2, 8, 8, 3), jnp.float32)
    kaiming = KaimingNet()
    _, jitted = factories.make_method("child", kaiming, task, x, rng)
    _assert_bitwise_equal(jitted, trainable_variables(kaiming.init(rng, x, train=False)))

    # HKT: child, adapters (the widths differ) and the parent's pass
    child, parent = ToyStagedNet(widths=(4, 8), num_classes=5), ToyStagedNet(widths=(6, 12), num_classes=5)
    shapes = jax.eval_shape(lambda: parent.init(jax.random.key(1), x))  # the adapters need only its shapes
    parent_variables = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), shapes)
    _, jitted = factories.make_method(
        "hkt", child, task, x, rng, parent=parent, parent_variables=parent_variables, hkt=HKTSettings(inherit_loss="ce")
    )
    engine_config = factories.HKTConfig(inherit_loss="ce")
    eager = factories.HKT(child, parent, engine_config, task=task).init(rng, x, parent_variables)
    assert jitted["params"]["adapters"]
    _assert_bitwise_equal(jitted, eager)

    optim = OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine")
    tx, _ = factories.make_optimization(optim, steps_per_epoch=10, total_steps=100)
    _assert_bitwise_equal(
        tx.init(jitted["params"]), make_optimizer(optim, make_schedule(optim, 10, 100)).init(jitted["params"])
    )


# ---------------------------------------------------------------- data.source=auto without tensorflow-datasets


def test_auto_source_falls_back_when_tensorflow_datasets_is_not_installed(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import tensorflow_datasets -> ImportError
    with pytest.raises(TFDSNotInstalled, match="pip install tensorflow-datasets") as error:
        load_tfds("cifar10", "train", str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)  # a user error (exit 2), not a traceback

    monkeypatch.setenv("HKT_SHARED_DATA", str(tmp_path / "shared"))
    config = DataConfig(source="auto")
    with pytest.raises(FileNotFoundError, match="tensorflow-datasets") as error:  # no archive either
        resolve_auto_source(config)
    assert "no shared archive at" in str(error.value)

    archive = shared_cifar10_archive()
    assert archive.is_relative_to(tmp_path)
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")  # resolving only checks that it is there
    with caplog.at_level(logging.WARNING, logger="hkt_jax.data.pipeline"):
        resolved = resolve_auto_source(config)
    assert (resolved.source, resolved.path) == ("image_folder", str(archive))
    assert "tensorflow-datasets is not installed" in caplog.text and "shared JPEG-q75 archive" in caplog.text
