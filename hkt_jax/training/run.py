"""One training run's parts: the train state, the jit-compiled train/eval/predict steps, the
``Run`` that ``build_run`` assembles from a config through the factories, and ``export`` (the trained
network alone). The loop (``hkt_jax.training.train``) and its hooks (``hkt_jax.training.hooks``) both
build on these, so neither needs the other's internals.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax.data.stream import Datasets
from hkt_jax.training import checkpoint, factories, sharding, stopping
from hkt_jax.training.config import ExperimentConfig
from hkt_jax.training.methods import NEEDS_PARENT, child_variables, stage_split_for
from hkt_jax.tasks import Task, make_task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# -- steps ------------------------------------------------------------------------------------------


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    task: Task | None = None,
    *,
    skip_nonfinite: bool = False,
):
    """One optimizer step. Differentiates w.r.t. ``state.params`` only: the parent
    variables are an input, never a gradient target. ``task`` adds its train metrics.

    The metrics also hold ``grad_norm`` and ``nonfinite``, a bitmask of the terms
    (``stopping.NONFINITE_TERMS``) that went NaN/inf, which the loop reads before any
    hook can save the new state. ``skip_nonfinite`` keeps the old parameters,
    batch statistics and optimizer state for such a step (the step and data
    position still advance) and counts it in ``skipped_steps``."""

    def train_step(state: TrainState, parent_variables: Any, batch: dict[str, jax.Array]):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, aux), grads = grad_fn(state.params, state.batch_stats, parent_variables, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(aux["metrics"])
        if task is not None:
            metrics.update(task.train_metrics(aux["outputs"], batch))
        metrics["lr"] = schedule(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        nonfinite = stopping.nonfinite_bits(metrics, metrics["grad_norm"], params)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=aux["batch_stats"], opt_state=opt_state
        )
        if skip_nonfinite:
            keep_old = nonfinite != 0
            new_state = jax.tree.map(
                lambda new, old: jnp.where(keep_old, old, new), new_state, state.replace(step=state.step + 1)
            )
            metrics["skipped_steps"] = keep_old.astype(jnp.int32)
        metrics["nonfinite"] = nonfinite
        return new_state, metrics

    return train_step


def make_predict(model: nn.Module, task: Task):
    """The network alone on a batch, in inference mode (what evaluation and logged images see)."""

    def predict(params, batch_stats, batch):
        return model.apply(child_variables(params, batch_stats), task.model_input(batch), train=False)

    return predict


def make_eval_step(model: nn.Module, task: Task):
    """The task's eval sums of the network alone, in inference mode."""
    predict = make_predict(model, task)

    def eval_step(params, batch_stats, batch):
        return task.eval_sums(predict(params, batch_stats, batch), batch)

    return eval_step


def evaluate(task: Task, eval_step, params, batch_stats, batches, mesh) -> dict[str, float]:
    """One pass over ``batches``: the eval step's sums added up, then finished by the task."""
    totals = None
    for batch in batches:
        sums = eval_step(params, batch_stats, sharding.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return task.finish_eval({k: float(v) for k, v in jax.device_get(totals).items()})


def initial_state(init_variables: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    params = init_variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=init_variables["batch_stats"],
        opt_state=tx.init(params),
    )


def compile_steps(
    *,
    task: Task,
    model: nn.Module,
    loss_fn: Callable,
    tx,
    schedule,
    parent_variables: Any,
    mesh,
    state: TrainState,
    shard_trainable: bool = False,
    parent_min_elements: int | None = None,
    skip_nonfinite: bool = False,
):
    """jit the train and eval steps over the mesh: batch split over the devices,
    trainable state replicated (or sharded, ``shard_trainable``), the parent
    replicated (or FSDP-sharded over ``model``); the train state is donated."""
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state_sh = sharding.state_shardings(state, mesh, shard_trainable=shard_trainable)
    parent_kwargs = {} if parent_min_elements is None else {"min_elements": parent_min_elements}
    parent_sh = sharding.parent_shardings(parent_variables, mesh, **parent_kwargs)
    train_step = jax.jit(
        make_train_step(sharding.gather_inside(loss_fn, mesh), tx, schedule, task, skip_nonfinite=skip_nonfinite),
        in_shardings=(state_sh, parent_sh, data),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
    )
    # Eval also takes the best exported network (child params only): sharded params keep their own layout.
    eval_in = {} if shard_trainable else {"in_shardings": (repl, repl, data)}
    eval_step = jax.jit(make_eval_step(model, task), out_shardings=repl, **eval_in)
    return train_step, eval_step


# -- set-up -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything one training run is built from (``build_run`` assembles it from the factories)."""

    config: ExperimentConfig
    task: Task
    model: nn.Module
    spec: dict[str, Any]
    loss_fn: Callable
    parent_variables: Any
    parent_info: dict[str, Any]
    init_variables: dict[str, Any]
    datasets: Datasets
    mesh: Any
    conv_impl: str
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation

    def evaluate_split(self, eval_step, params, batch_stats, split: str) -> dict[str, float]:
        return evaluate(self.task, eval_step, params, batch_stats, self.datasets.eval_batches(split), self.mesh)


def build_run(config: ExperimentConfig) -> Run:
    task = make_task(config)
    batch_size = config.train.batch_size
    mesh = factories.make_mesh(config.mesh.data, config.mesh.model, global_batch_size=batch_size)
    datasets = task.make_datasets(config.data, global_batch_size=batch_size, seed=config.train.seed)
    trained_cfg = config.parent if config.method == "parent" else config.child
    stage_split = stage_split_for(config.method, config.hkt.stage_split)
    conv_impl = factories.conv_impl_for_mesh(trained_cfg.conv_impl, mesh)
    compute_dtype = config.train.compute_dtype
    model, spec = factories.make_model(
        trained_cfg,
        task.model_kwargs(datasets),
        stage_split=stage_split,
        conv_impl=conv_impl,
        compute_dtype=compute_dtype,
    )
    parent = parent_variables = None
    parent_info: dict[str, Any] = {}
    if config.method in NEEDS_PARENT:
        if not config.parent_ckpt:
            raise ValueError(f"method={config.method!r} needs a parent: set parent_ckpt=DIR")
        parent, parent_variables, parent_spec = factories.load_parent(
            config.parent_ckpt,
            stage_split=stage_split,
            conv_impl=factories.conv_impl_for_mesh(config.parent.conv_impl, mesh),
            expected_kwargs=task.model_kwargs(datasets),
            task=task.name,
            compute_dtype=compute_dtype,
        )
        parent_info = {"dir": str(config.parent_ckpt), **parent_spec}
    if config.method == "hkt":
        model, parent = factories.tap_models(model, parent, config.hkt.child_taps, config.hkt.parent_taps)
    loss_fn, init_variables = factories.make_method(
        config.method,
        model,
        task,
        task.example_input(datasets),
        jax.random.key(config.train.seed),
        parent=parent,
        parent_variables=parent_variables,
        hkt=config.hkt,
        kd=config.kd,
        fitnet=config.fitnet,
        at=config.at,
        freeze_batch_norm=config.train.freeze_batch_norm,
    )
    if config.init_ckpt:
        init_variables = factories.start_from(init_variables, config.init_ckpt, spec)
    steps_per_epoch = max(1, datasets.num_train // batch_size)
    total_steps = config.train.steps or math.ceil(config.train.epochs * steps_per_epoch)
    tx, schedule = factories.make_optimization(config.optim, steps_per_epoch, total_steps, spec)
    return Run(
        config,
        task,
        model,
        spec,
        loss_fn,
        parent_variables if parent_variables is not None else {},
        parent_info,
        init_variables,
        datasets,
        mesh,
        conv_impl,
        steps_per_epoch,
        total_steps,
        schedule,
        tx,
    )


def inference_ms_per_image(model: nn.Module, variables: Any, example: Any, repeats: int = 5) -> float:
    """Median wall time of the jit-compiled network alone, per example of ``example``'s batch."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    jax.block_until_ready(apply(variables, example))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(apply(variables, example))
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / jax.tree.leaves(example)[0].shape[0]


def export(directory: Path, run: Run, state: TrainState, metadata: dict[str, Any]) -> None:
    """The trained network alone, with what it was trained on (so a later run can check it as a parent).
    Variables are float32 whatever ``train.compute_dtype`` was; the metadata records that dtype."""
    variables = jax.device_get(child_variables(state.params, state.batch_stats))
    data = {"task": run.task.name, "source": run.config.data.source, "name": run.config.data.name}
    trained = {"data": data, "compute_dtype": run.config.train.compute_dtype}
    # Every process calls orbax (its save is a collective); only process 0 writes files.
    checkpoint.save_model(directory, variables, {**run.spec, "metadata": {**trained, **metadata}})
