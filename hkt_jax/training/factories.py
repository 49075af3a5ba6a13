"""Small factories a training run is assembled from; tests and benchmarks call the same ones.

Each takes the objects it needs (not the whole experiment config) and does one
thing: the device mesh, the conv implementation for that mesh, a model from its
config, a frozen parent (loaded and folded), a method's loss with its initial
trainable variables, the optimizer and schedule. ``hkt_jax.training.run.build_run``
composes them for ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.training import checkpoint, methods, sharding
from hkt_jax.models import fold
from hkt_jax.training.config import (
    COMPUTE_DTYPES,
    ATSettings,
    FitNetSettings,
    HKTSettings,
    KDSettings,
    ModelConfig,
    OptimConfig,
)
from hkt_jax.engine.hkt import HKT, HKTConfig
from hkt_jax.training.methods import NEEDS_PARENT, hkt_loss, kd_loss, plain_loss, trainable_variables
from hkt_jax.models import build_model, model_spec
from hkt_jax.models.tapped import Tapped, tapped_boundaries
from hkt_jax.training.optim import make_optimizer, make_schedule
from hkt_jax.tasks import Task


def conv_impl_for_mesh(conv_impl: str, mesh: jax.sharding.Mesh) -> str:
    """The CPU kernels are custom calls that do not shard: a multi-device or non-CPU mesh gets XLA's
    convolutions; otherwise the configured choice stands ("auto" = decided per convolution)."""
    single_cpu = mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    return conv_impl if single_cpu else "xla"


def compute_dtype_overrides(compute_dtype: str) -> dict[str, Any]:
    """Build-time ``build_model`` overrides for ``train.compute_dtype``: the activations' dtype is a
    run setting, never part of a spec, so one checkpoint builds in float32 or bfloat16 alike."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    return {} if compute_dtype == "float32" else {"dtype": jnp.dtype(compute_dtype)}


def make_model(
    model_config: ModelConfig,
    data_kwargs: dict[str, Any],
    *,
    stage_split: str = "paper",
    conv_impl: str | None = None,
    compute_dtype: str = "float32",
) -> tuple[nn.Module, dict[str, Any]]:
    """(module, spec) from the model config plus what the data decides (``Task.model_kwargs``, e.g.
    ``num_classes``); the spec is what an exported checkpoint records to rebuild it (without
    ``compute_dtype``, which only sets the module's activations' dtype)."""
    kwargs = {**model_config.kwargs(), **data_kwargs}
    if conv_impl is not None and "conv_impl" in kwargs:
        kwargs["conv_impl"] = conv_impl
    spec = model_spec(model_config.arch, **kwargs)
    return build_model(spec, stage_split=stage_split, **compute_dtype_overrides(compute_dtype)), spec


def load_parent(
    parent_dir: str | Path,
    *,
    stage_split: str = "paper",
    conv_impl: str | None = None,
    expected_kwargs: dict[str, Any] | None = None,
    task: str | None = None,
    compute_dtype: str = "float32",
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(module, variables, spec) of a frozen parent, its BatchNorm folded where a rule is registered.

    ``expected_kwargs`` (e.g. the task's ``num_classes``) must match what the checkpoint records; ``task``
    (the run's task name) only words the error. The parent runs in ``compute_dtype``; its variables stay
    as saved (float32)."""
    variables, spec = checkpoint.load_model(parent_dir)
    recorded = spec.get("kwargs", {})
    wrong = {
        key: value
        for key, value in (expected_kwargs or {}).items()
        if recorded.get(key) is not None and recorded[key] != value
    }
    if wrong:
        needs = ", ".join(f"{key}={value}" for key, value in wrong.items())
        run = f"this {task} run needs a {task} parent" if task else "this run needs a parent"
        raise ValueError(f"parent at {parent_dir} is {describe_model_checkpoint(spec)}, but {run} with {needs}")
    overrides = {
        "stage_split": stage_split,
        **({"conv_impl": conv_impl} if conv_impl is not None else {}),
        **compute_dtype_overrides(compute_dtype),
    }
    parent = build_model(spec, **overrides)
    parent, variables = fold.fold_parent(parent, variables)
    return parent, variables, spec


def describe_model_checkpoint(spec: dict[str, Any]) -> str:
    """What a model checkpoint holds, from its spec: ``a unet (num_classes=3, ...) trained for segmentation
    on synthetic synthetic_ct data`` (or where it was converted from)."""
    kwargs = ", ".join(f"{key}={value}" for key, value in sorted(spec.get("kwargs", {}).items()))
    metadata = spec.get("metadata", {})
    data = metadata.get("data", {})
    if "task" in data:
        origin = f" trained for {data['task']} on {data.get('source')} {data.get('name')} data"
    elif "converted_from" in metadata:
        origin = f" converted from {metadata['converted_from']}"
    else:
        origin = ""
    return f"a {spec.get('arch')} ({kwargs}){origin}"


def make_method(
    method: str,
    model: nn.Module,
    task: Task,
    example_input: Any,
    rng: jax.Array,
    *,
    parent: nn.Module | None = None,
    parent_variables: Any = None,
    hkt: HKTConfig = HKTSettings(),
    kd: KDSettings = KDSettings(),
    fitnet: FitNetSettings = FitNetSettings(),
    at: ATSettings = ATSettings(),
    freeze_batch_norm: bool = False,
) -> tuple[Callable, dict[str, Any]]:
    """(loss_fn, initial trainable variables) of a training method (``hkt_jax.training.methods``).
    The variables are initialised inside ``jax.jit`` (``jit_init``).
    ``freeze_batch_norm``: the trained network runs with ``train=False`` (its BatchNorm uses and keeps
    the running statistics; in this project's models ``train`` switches nothing else)."""
    train = not freeze_batch_norm
    if method in NEEDS_PARENT and parent is None:
        raise ValueError(f"method={method!r} needs a parent: set parent_ckpt=DIR")
    if method == "hkt":
        engine_config = HKTConfig(**{f.name: getattr(hkt, f.name) for f in dataclasses.fields(HKTConfig)})
        if engine_config.boundaries is None:  # the model's own leaf wiring, where it has one (e.g. RAFT)
            boundaries = default_boundaries(model, getattr(hkt, "stages", None))
            engine_config = dataclasses.replace(engine_config, boundaries=boundaries)
        if isinstance(model, Tapped) or isinstance(parent, Tapped):  # mix the tapped "feature" leaves
            boundaries = tapped_boundaries(model, parent, engine_config.boundaries)
            engine_config = dataclasses.replace(engine_config, boundaries=boundaries)
        engine = HKT(model, parent, engine_config, task=task, native_distill=native_distill(task, hkt, kd))
        return hkt_loss(engine, train=train), jit_init(engine.init)(rng, example_input, parent_variables)
    init_variables = trainable_variables(jit_init(functools.partial(model.init, train=False))(rng, example_input))
    if method == "kd":
        return kd_loss(model, parent, task, temperature=kd.temperature, weight=kd.weight, train=train), init_variables
    if method in methods.FEATURE_METHODS:
        return feature_method(
            method,
            model,
            parent,
            task,
            example_input,
            rng,
            parent_variables,
            init_variables,
            fitnet=fitnet,
            at=at,
            train=train,
        )
    return plain_loss(model, task, train=train), init_variables


def native_distill(task: Task, hkt: HKTConfig, kd: KDSettings) -> Callable | None:
    """HKT's L2 from the parent's own outputs (``hkt.native_target=parent``): the task's KD loss."""
    if getattr(hkt, "native_target", "labels") == "labels":
        return None
    if type(task).distill_loss is Task.distill_loss:
        raise ValueError(f"hkt.native_target=parent needs a distillation loss, which task {task.name!r} lacks")

    def loss(student, teacher, batch):
        return task.distill_loss(student, teacher, batch, temperature=kd.temperature, weight=kd.weight)[0]

    return loss


def feature_method(
    method: str,
    model: nn.Module,
    parent: nn.Module,
    task: Task,
    example_input: Any,
    rng: jax.Array,
    parent_variables: Any,
    init_variables: dict[str, Any],
    *,
    fitnet: FitNetSettings,
    at: ATSettings,
    train: bool,
) -> tuple[Callable, dict[str, Any]]:
    """fitnet / at (``hkt_jax.training.methods``): the stage ends checked on the example input's shapes; FitNet's
    regressor (child width -> parent width at ``fitnet.stage``) joins the trainable variables as an adapter."""
    params, stats = init_variables["params"], init_variables["batch_stats"]
    child_outputs = jax.eval_shape(lambda: methods.run_stages(model, params, stats, example_input, train=False)[0])
    parent_outputs = jax.eval_shape(lambda: methods.parent_stage_outputs(parent, parent_variables, example_input))
    points = methods.feature_points(method, model, parent, task, child_outputs, parent_outputs)
    if method == "at":
        return methods.at_loss(model, parent, task, beta=at.beta, p=at.p, train=train), init_variables
    if fitnet.stage not in points:
        raise ValueError(f"fitnet.stage={fitnet.stage!r}: expected one of the stage ends {points}")
    index = points.index(fitnet.stage)
    regressor = methods.HintRegressor(parent_outputs[index].shape[-1])
    hinted = jnp.zeros(child_outputs[index].shape, child_outputs[index].dtype)
    regressor_params = regressor.init(jax.random.fold_in(rng, 1), hinted)["params"]
    loss_fn = methods.fitnet_loss(model, parent, task, regressor, stage_index=index, weight=fitnet.weight, train=train)
    return loss_fn, {**init_variables, "params": {**params, "adapters": {methods.REGRESSOR_KEY: regressor_params}}}


def jit_init(init_fn: Callable) -> Callable:
    """``init_fn`` (a Flax ``init``) compiled as one program: one compilation instead of one per eager
    operation (about a hundred at a run's start-up), and one the persistent compilation cache can keep.

    On CPU the program is compiled without XLA's algebraic simplifier, whose rewrites of the initialisers'
    float arithmetic change some values by one ulp: without it they equal the eager initialisation bit for
    bit (``tests/test_startup.py``), so a seed still gives the network it gave before."""
    options = {"xla_disable_hlo_passes": "algsimp"} if jax.default_backend() == "cpu" else {}
    return jax.jit(init_fn, compiler_options=options)


def start_from(init_variables: dict[str, Any], directory: str, spec: dict[str, Any]) -> dict[str, Any]:
    """``init_variables`` with the trained network's own variables read from an exported network (RAFT's
    chairs -> things -> sintel chain); adapters keep their fresh values. The architecture must match."""
    try:
        variables, found = checkpoint.load_model(directory)
    except FileNotFoundError as err:
        raise ValueError(f"init_ckpt={directory}: {err}") from None
    as_saved = lambda s: json.loads(json.dumps([s.get("arch"), s.get("kwargs")]))  # tuples -> lists, as on disk
    if as_saved(found) != as_saved(spec):
        raise ValueError(
            f"init_ckpt={directory} holds {found.get('arch')} {found.get('kwargs')}, but this run "
            f"trains {spec.get('arch')} {spec.get('kwargs')}"
        )
    mine = {"params": init_variables["params"]["child"], "batch_stats": init_variables["batch_stats"]["child"]}
    theirs = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    def shapes(tree):
        return [(jax.tree_util.keystr(path), np.shape(x)) for path, x in jax.tree_util.tree_leaves_with_path(tree)]

    if shapes(mine) != shapes(theirs):
        differ = sorted(set(shapes(mine)) ^ set(shapes(theirs)))
        raise ValueError(f"init_ckpt={directory}: its variables do not fit this network: {differ[:8]}")
    theirs = jax.tree.map(lambda new, like: jnp.asarray(new, like.dtype), theirs, mine)
    return {
        **init_variables,
        "params": {**init_variables["params"], "child": theirs["params"]},
        "batch_stats": {**init_variables["batch_stats"], "child": theirs["batch_stats"]},
    }


def default_boundaries(model: nn.Module, stages: int | None) -> tuple | None:
    """``model.hkt_boundaries(stages)`` for models whose stage outputs are pytrees; None (whole stage
    outputs at every boundary) otherwise, where ``hkt.stages`` cannot be chosen."""
    if hasattr(model, "hkt_boundaries"):
        return model.hkt_boundaries(stages)
    if stages is not None:
        raise ValueError(
            f"hkt.stages={stages}: {type(model).__name__} has no hkt_boundaries(stages) wiring; "
            "leave hkt.stages unset (its stage split decides the boundaries)"
        )
    return None


def tap_models(
    child: nn.Module, parent: nn.Module, child_taps: tuple[str, ...] = (), parent_taps: tuple[str, ...] = ()
) -> tuple[nn.Module, nn.Module]:
    """Cut child and/or parent at named submodule calls (``hkt_jax.models.Tapped``); a parent is tapped
    after folding, and stage names are made to agree (the untapped side's, or ``tap0..`` on both)."""
    if not child_taps and not parent_taps:
        return child, parent

    def names(taps, other):
        if other is not None and not taps:
            return None
        if other is not None and len(other.stage_names) != len(taps) + 1:
            raise ValueError(
                f"{len(taps)} taps make {len(taps) + 1} stages, but the other model has "
                f"{len(other.stage_names)} stages {tuple(other.stage_names)}"
            )
        return tuple(other.stage_names) if other is not None else tuple(f"tap{i}" for i in range(len(taps) + 1))

    if child_taps and parent_taps:
        if len(child_taps) != len(parent_taps):
            raise ValueError(
                f"hkt.child_taps has {len(child_taps)} paths and hkt.parent_taps {len(parent_taps)}: "
                "aligned stages need as many on both sides"
            )
        return (
            Tapped(child, taps=tuple(child_taps), names=names(child_taps, None)),
            Tapped(parent, taps=tuple(parent_taps), names=names(parent_taps, None)),
        )
    if child_taps:
        return Tapped(child, taps=tuple(child_taps), names=names(child_taps, parent)), parent
    return child, Tapped(parent, taps=tuple(parent_taps), names=names(parent_taps, child))


def make_optimization(
    optim: OptimConfig, steps_per_epoch: int, total_steps: int, trained_spec: dict[str, Any] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). ``trained_spec``: the trained network's model spec (a deep CIFAR ResNet may get
    the low-rate warm-up). The optimizer's ``init`` runs inside ``jax.jit`` (one compilation, not one per eager
    operation; its state is zeros and counters either way)."""
    schedule = make_schedule(optim, steps_per_epoch, total_steps, trained_spec)
    tx = make_optimizer(optim, schedule)
    return tx._replace(init=jax.jit(tx.init)), schedule


def make_mesh(data: int = -1, model: int = 1, *, global_batch_size: int | None = None) -> jax.sharding.Mesh:
    mesh = sharding.make_mesh(data, model)
    if global_batch_size is not None:
        sharding.check_global_batch(global_batch_size, mesh)
    return mesh
