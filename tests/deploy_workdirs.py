"""Tiny finished training workdirs (random-init children, ``export/child`` + ``config.json``) and the
project's own outputs on raw inputs, for the deployment-export tests.

A workdir is what ``hkt_jax.training.run.export`` leaves: the child saved with ``checkpoint.save_model``
and the run's config; no training runs here. The reference outputs go through the project's eval
path: the task's ``make_predict`` on a batch prepared by the project's data code.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hkt_jax.training.checkpoint import load_model, save_model
from hkt_jax.data.pipeline import _Normalizer
from hkt_jax.data.volumes import window_hu
from hkt_jax.training.methods import trainable_variables
from hkt_jax.models.registry import build_model, model_spec
from hkt_jax.tasks.classification import Classification
from hkt_jax.tasks.flow import Flow
from hkt_jax.tasks.segmentation import Segmentation
from hkt_jax.training.run import make_predict
from tests.conftest import REPO_ROOT, shared_data_dir

NORMALIZATION = "cifar"  # not the default (imagenet): the export must read the run's own
WINDOW = (-150.0, 300.0)  # not the default either
SLICE = 32
FLOW_FRAME = 64

# arch -> (model kwargs, the run's config.json, example input for init)
WORKDIRS = {
    "cifar_resnet": (
        {"depth": 8, "num_classes": 10, "conv_impl": "xla"},
        {"data": {"normalization": NORMALIZATION, "name": "cifar10"}},
    ),
    "raft": ({"small": True, "iters": 1}, {"data": {"crop_size": [FLOW_FRAME, FLOW_FRAME]}}),
    "pocketnet": (
        {"width": 8, "depth": 2, "num_classes": 3, "in_channels": 1},
        {"seg": {"window": list(WINDOW), "slice_size": SLICE}, "data": {"source": "synthetic"}},
    ),
}


def _init_input(arch: str, frame: int):
    if arch == "cifar_resnet":
        return (jnp.zeros((1, 32, 32, 3)),)
    if arch == "raft":
        return (jnp.zeros((1, frame, frame, 3)), jnp.zeros((1, frame, frame, 3)))
    return (jnp.zeros((1, SLICE, SLICE, 1)),)


@functools.cache
def _random_variables(arch: str, seed: int) -> dict:
    """Random child weights (BatchNorm statistics too), made once per process: RAFT's initialisation is the
    costliest program these tests compile. Its weights do not depend on the frame size, so it is initialised
    at ``FLOW_FRAME`` whatever frames the workdir is for, and from an ``rbg`` key (XLA compiles the
    initialisation about twice as fast as from the default threefry key)."""
    kwargs, _ = WORKDIRS[arch]
    key = jax.random.key(seed, impl="rbg") if arch == "raft" else jax.random.key(seed)
    variables = jax.jit(build_model(model_spec(arch, **kwargs)).init)(key, *_init_input(arch, FLOW_FRAME))
    variables = jax.tree.map(np.asarray, dict(variables))
    rng = np.random.default_rng(seed)  # running statistics away from (0, 1), so normalisation matters
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, x: (
                rng.uniform(0.5, 2.0, x.shape) if "var" in str(path[-1]) else rng.normal(0, 0.2, x.shape)
            ).astype(np.float32),
            variables["batch_stats"],
        )
    return variables


def make_workdir(root: Path, arch: str, *, frame: int = FLOW_FRAME, seed: int = 0) -> Path:
    """A finished run's workdir for ``arch``: random child weights (BatchNorm statistics too) + config.json."""
    kwargs, config = WORKDIRS[arch]
    if arch == "raft":
        config = {"data": {"crop_size": [frame, frame]}}
    spec = model_spec(arch, **kwargs)
    variables = _random_variables(arch, seed)
    workdir = root / f"run-{arch}"
    save_model(workdir / "export" / "child", variables, {**spec, "metadata": {"data": {"task": arch}}})
    (workdir / "config.json").write_text(json.dumps(config))
    return workdir


def raw_inputs(arch: str, batch: int, *, frame: int = FLOW_FRAME, seed: int = 0) -> list[np.ndarray]:
    """Inputs as a user has them: real CIFAR-10 / flow images where the shared data has them."""
    rng = np.random.default_rng(seed)
    if arch == "cifar_resnet":
        pngs = sorted((shared_data_dir() / "cifar-samples").glob("cifar10_*.png"))
        if len(pngs) >= batch:
            from PIL import Image

            return [np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs[seed : seed + batch]])]
        return [rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)]
    if arch == "raft":
        frames = [shared_data_dir() / "flow" / "sintel-alley1" / f"frame_000{k}.png" for k in (1, 2)]
        if all(f.is_file() for f in frames):
            from PIL import Image

            full = [np.asarray(Image.open(f).convert("RGB")) for f in frames]
            corners = [(16 * k + 8 * seed, 24 * k) for k in range(batch)]  # a different crop per pair
            return [np.stack([image[y : y + frame, x : x + frame] for y, x in corners]) for image in full]
        return [rng.integers(0, 256, (batch, frame, frame, 3), dtype=np.uint8) for _ in range(2)]
    hu = rng.normal(40, 150, (batch, SLICE, SLICE)).astype(np.float32)  # soft tissue around 40 HU
    return [hu]


def project_outputs(workdir: Path, arch: str, inputs: list[np.ndarray]) -> np.ndarray:
    """The project's eval path on ``inputs``: its data code prepares the batch, ``make_predict`` runs the child
    (as built by training: default ``conv_impl``, RAFT unrolled)."""
    variables, spec = load_model(workdir / "export" / "child")
    overrides = {"conv_impl": "auto"} if arch == "cifar_resnet" else {}
    model = build_model(spec, **overrides)
    if arch == "cifar_resnet":
        task, batch = Classification(), {"image": _Normalizer(NORMALIZATION)(inputs[0])}
    elif arch == "raft":
        task, batch = Flow(), {"image1": inputs[0].astype(np.float32), "image2": inputs[1].astype(np.float32)}
    else:
        task, batch = Segmentation(), {"image": window_hu(inputs[0], WINDOW)[..., None]}
    predict = jax.jit(make_predict(model, task))
    trainable = trainable_variables(variables)  # the train state's form, as evaluation sees it
    out = np.asarray(predict(trainable["params"], trainable["batch_stats"], batch))
    return out[-1] if arch == "raft" else out


def project_outputs_per_batch(workdir: Path, arch: str, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
    """``project_outputs`` of each input list, from one call on them all (one compilation, not one per batch
    size): evaluation treats every example alone (BatchNorm in inference mode), so the split is exact."""
    joined = [np.concatenate(parts) for parts in zip(*batches)]
    ends = np.cumsum([len(inputs[0]) for inputs in batches])[:-1]
    return np.split(project_outputs(workdir, arch, joined), ends)


def blocked_jax_dir(root: Path) -> Path:
    """A directory whose ``jax`` package raises ImportError: put it first on PYTHONPATH."""
    blocker = root / "no_jax"
    (blocker / "jax").mkdir(parents=True, exist_ok=True)
    (blocker / "jax" / "__init__.py").write_text("raise ImportError('jax is blocked in this test process')\n")
    return blocker


def run_fresh(
    script: str, cwd: Path, *, isolated: bool = True, pythonpath: Path | None = None, timeout: int = 300
) -> str:
    """``python -c script`` in a new process where ``hkt_jax`` is not importable (cwd outside the repo)."""
    assert REPO_ROOT not in [cwd, *cwd.parents], "the fresh process must not start inside the repository"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    # A developer's `pip install -e .` puts hkt_jax on every path through a finder in site-packages: drop it,
    # so the process is the user's, who has the exported files and jax/torch but not this project.
    guard = (
        "import importlib.util, sys\n"
        "sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        "assert importlib.util.find_spec('hkt_jax') is None, 'hkt_jax is importable here'\n"
    )
    command = [sys.executable, *(["-I"] if isolated else []), "-c", guard + script]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout
