"""Every experiment config and grid loads, builds its runs and traces their train steps; the paper-size configs
have the sizes their docstrings state."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkt_jax.grids import comparison
from hkt_jax.tasks import make_task
from hkt_jax.tasks.flow_data import FlowDataConfig
from hkt_jax.tasks.segmentation import SegDataConfig
from hkt_jax.training import checkpoint, factories
from hkt_jax.training.config import ExperimentConfig, apply_overrides, load_config
from hkt_jax.training.experiment import PARENT_SUBDIR, planned_runs
from hkt_jax.training.experiment_cli import config_name
from hkt_jax.training.methods import NEEDS_PARENT
from hkt_jax.training.run import build_run, compile_steps, initial_state
from hkt_jax.models import parameter_count
from hkt_jax.models.registry import build_model, model_spec

CONFIGS = sorted(
    p.stem
    for p in (Path(__file__).parent.parent / "experiments" / "configs").glob("*.py")
    if not p.stem.startswith(("_", "grid_"))
)
GRIDS = sorted(
    p.stem[len("grid_") :] for p in (Path(__file__).parent.parent / "experiments" / "configs").glob("grid_*.py")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads(name):
    config = load_config(name)
    assert config.record()["method"] == config.method


@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_loads_and_its_variant_configs_exist(name):
    grid = comparison.load_grid(name)
    # The flow and segmentation entry points name their configs without the file prefix.
    prefix = {"experiments.flow_hkt": "flow_", "experiments.seg_hkt": "seg_"}.get(grid.experiment, "")
    for variant in grid.variants:
        assert config_name(grid.config_for(variant), prefix) in CONFIGS, (variant, grid.config_for(variant))


def test_segmentation_at_the_papers_sizes():
    """The paper: an 80M-parameter parent and a 0.8M child (within 6 %)."""
    config = load_config("seg_lits_paper")
    counts = {}
    for role in ("parent", "child"):
        model_config = getattr(config, role)
        model = build_model(model_spec(model_config.arch, **model_config.kwargs(), num_classes=3, in_channels=1))
        variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)), train=False))
        counts[role] = parameter_count(variables["params"])
    assert counts == {"parent": 84_233_003, "child": 843_011}


# -- every run a config or grid plans: built on stand-in data, its train step traced ----------------------
#
# Cost: building a run traces its networks' init and tracing a train step traces the networks forward and
# backward (seconds each for RAFT or a ResNet-110), so each distinct run is built once and the whole train
# step is traced once per *loss signature* (task, method and its settings, network architectures); the other
# runs of a signature trace their optimizer update on their own parameters.


def _grid_runs(name: str) -> dict[str, ExperimentConfig]:
    """Each command line the grid launches (``comparison.run_command`` / ``parent_command``), as configs."""
    grid = comparison.load_grid(name)
    prefix = importlib.import_module(grid.experiment).COMMAND.config_prefix
    root = Path("ROOT")
    commands = {variant: comparison.run_command(grid, root, variant, grid.seeds[0]) for variant in grid.variants}
    if grid.parent is not None:
        commands[PARENT_SUBDIR] = comparison.parent_command(grid, root)
    configs = {}
    for variant, command in commands.items():
        name_at, workdir_at = command.index("--config") + 1, command.index("--workdir") + 1
        configs[variant] = apply_overrides(
            load_config(config_name(command[name_at], prefix)), command[workdir_at + 1 :]
        )
    return configs


def _planned(label: str, config: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """The training runs ``experiments.*_hkt`` makes for ``config``: the parent's first when it trains one."""
    runs = planned_runs(config, Path("WORKDIR"))
    return {
        f"{label}/{PARENT_SUBDIR}" if workdir.name == PARENT_SUBDIR and len(runs) > 1 else label: run
        for run, workdir in runs
    }


def _all_runs() -> dict[str, ExperimentConfig]:
    """Label -> config of every run: each config's planned runs, then each grid variant's (and shared parent's)."""
    runs: dict[str, ExperimentConfig] = {}
    for name in CONFIGS:
        runs.update(_planned(name, load_config(name)))
    for name in GRIDS:
        for variant, config in _grid_runs(name).items():
            runs.update(_planned(f"grid_{name}/{variant}", config))
    return runs


def _without(record: dict, *keys: str) -> dict:
    return {key: value for key, value in record.items() if key not in keys}


def build_signature(config: ExperimentConfig) -> str:
    """Runs equal but for their seed and logging cadence build the same run."""
    record = config.record()
    record["train"] = _without(
        record["train"],
        "seed",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
    )
    return json.dumps(record, sort_keys=True, default=str)


SIZE_FIELDS = ("depth", "width", "widths")  # ModelConfig fields that only scale a network


def loss_signature(config: ExperimentConfig) -> str:
    """What decides the structure of a train step's loss and gradient: the task and its settings, the method
    and its settings, the trained (and frozen) networks' architectures, the train-mode switches. Float
    settings (weights, lambda) are constants of the program: only whether they are zero is kept."""
    record = config.record()
    kept = {
        "task": record["task"],
        "method": record["method"],
        "mesh": record["mesh"],
        "seg": record.get("seg"),
        "train": {key: record["train"][key] for key in ("freeze_batch_norm", "compute_dtype")},
    }
    if config.method in ("hkt", "kd", "fitnet", "at"):
        kept[config.method] = record[config.method]
    networks = (
        ["parent"] if config.method == "parent" else ["child"] + (["parent"] if config.method in NEEDS_PARENT else [])
    )
    for network in networks:
        kept[network] = _without(record[network], *SIZE_FIELDS)
    if kept["seg"] is not None:  # the data, splits and windowing of the stand-in are all the same
        kept["seg"] = {key: kept["seg"][key] for key in ("num_classes", "ce_weight", "dice_weight", "store_float16")}

    def zero_or_not(value):
        if isinstance(value, float):
            return value != 0
        if isinstance(value, dict):
            return {key: zero_or_not(v) for key, v in value.items()}
        return [zero_or_not(v) for v in value] if isinstance(value, list | tuple) else value

    return json.dumps(zero_or_not(kept), sort_keys=True, default=str)


def _size(config: ExperimentConfig) -> int:
    record = config.record()
    return sum(
        sum(value) if isinstance(value, list | tuple) else value
        for network in ("child", "parent")
        for key, value in record[network].items()
        if key in SIZE_FIELDS
    )


def _plan() -> tuple[dict[str, ExperimentConfig], frozenset[str]]:
    """(the distinct runs to build, the labels of those whose whole train step is traced: the smallest run of
    each loss signature)."""
    builds: dict[str, str] = {}
    for label, config in _all_runs().items():
        builds.setdefault(build_signature(config), label)
    runs = {label: config for label, config in _all_runs().items() if label in builds.values()}
    traced: dict[str, str] = {}
    for label in sorted(runs, key=lambda label: (_size(runs[label]), label)):
        traced.setdefault(loss_signature(runs[label]), label)
    return runs, frozenset(traced.values())


RUNS, TRACED = _plan()


def stand_in_data(config: ExperimentConfig, cache_dir: str) -> ExperimentConfig:
    """``config`` reading a few tiny synthetic examples of the same kind (rank, channels, classes, flow
    iterations) instead of its dataset: no real data is read and the pipelines stay cheap."""
    data = config.data
    if isinstance(data, FlowDataConfig):
        return dataclasses.replace(
            config,
            data=dataclasses.replace(
                data,
                source="synthetic",
                path=None,
                frame_size=(64, 64),
                crop_size=(64, 64),
                augment=False,
                sintel_mix="sintel",
                synthetic_train_size=8,
                validation_size=4,
                synthetic_test_size=4,
            ),
        )
    if isinstance(data, SegDataConfig):
        seg = dataclasses.replace(
            config.task_settings,
            synthetic_cases=3,
            synthetic_shape=(32, 32, 4),
            validation_cases=1,
            test_cases=1,
            slice_size=None,
        )
        return dataclasses.replace(
            config,
            task_settings=seg,
            data=dataclasses.replace(data, source="synthetic", path=None, cache_dir=cache_dir),
        )
    return dataclasses.replace(
        config,
        data=dataclasses.replace(
            data,
            source="synthetic",
            path=None,
            train_per_class=None,
            validation_size=8,
            synthetic_train_size=32,
            synthetic_test_size=8,
        ),
    )


def _stand_in_variables(tree):
    """Zeros of each leaf's shape and dtype that take no memory (nothing is computed with them)."""
    return jax.tree.map(lambda leaf: np.broadcast_to(np.zeros((), leaf.dtype), leaf.shape), tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


_CHECKPOINTS: dict[str, tuple] = {}  # stand-in checkpoints by spec and input: runs share parents


def _stand_in_checkpoint(model_config, data_kwargs, example_input) -> tuple:
    model, spec = factories.make_model(model_config, data_kwargs)
    key = json.dumps([spec, str(_abstract(example_input))], sort_keys=True, default=str)
    if key not in _CHECKPOINTS:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example_input, train=False))
        _CHECKPOINTS[key] = (_stand_in_variables(dict(shapes)), spec)
    return _CHECKPOINTS[key]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.mark.parametrize("label", sorted(RUNS))
def test_every_planned_run_builds_and_traces(label, data_cache, monkeypatch):
    """``build_run`` on stand-in data, with the parent and ``init_ckpt`` checkpoints replaced by networks of
    the spec the config names and variables initialised abstractly; then the jit-compiled train and eval steps
    (or, where a smaller run of its loss signature traces those, the optimizer update) are traced:
    ``jax.eval_shape``, nothing compiled or run."""
    config = stand_in_data(RUNS[label], data_cache)
    task = make_task(config.task, config)
    datasets = task.make_datasets(config.data, global_batch_size=config.train.batch_size, seed=0)
    data_kwargs, example = task.model_kwargs(datasets), task.example_input(datasets)
    trained = config.parent if config.method == "parent" else config.child
    checkpoints = {
        directory: _stand_in_checkpoint(model_config, data_kwargs, example)
        for directory, model_config in ((config.parent_ckpt, config.parent), (config.init_ckpt, trained))
        if directory
    }
    monkeypatch.setattr(checkpoint, "load_model", lambda directory: checkpoints[directory])
    monkeypatch.setattr(
        factories, "jit_init", lambda init: lambda *args: _stand_in_variables(jax.eval_shape(init, *args))
    )

    run = build_run(config)
    assert run.total_steps >= 1 and run.steps_per_epoch >= 1
    state = jax.eval_shape(lambda variables: initial_state(variables, run.tx), run.init_variables)
    if label not in TRACED:
        updates, opt_state = jax.eval_shape(lambda s: run.tx.update(s.params, s.opt_state, s.params), state)
        assert _abstract(updates) == _abstract(state.params) and _abstract(opt_state) == _abstract(state.opt_state)
        return
    train_step, eval_step = compile_steps(
        task=run.task,
        model=run.model,
        loss_fn=run.loss_fn,
        tx=run.tx,
        schedule=run.schedule,
        parent_variables=run.parent_variables,
        mesh=run.mesh,
        state=state,
        shard_trainable=config.mesh.shard_trainable,
        skip_nonfinite=config.train.skip_nonfinite_steps > 0,
    )
    new_state, metrics = jax.eval_shape(train_step, state, run.parent_variables, _abstract(next(run.datasets.train)))
    assert _abstract(new_state) == _abstract(state)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    if config.method == "hkt":
        assert {"l1", "l2", "l3"} <= set(metrics)
    eval_batch = _abstract(next(run.datasets.eval_batches("test")))
    sums = jax.eval_shape(eval_step, state.params, state.batch_stats, eval_batch)
    assert all(value.shape == () for value in jax.tree.leaves(sums)), sums
