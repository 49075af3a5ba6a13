"""Train state, jit-compiled train/eval steps, and the one restartable training loop every task uses.

``train_and_evaluate(config, workdir)`` trains one network (the child, or a
parent from scratch) and leaves in ``workdir``: ``metrics.jsonl``, TensorBoard
events, orbax checkpoints (rerunning resumes from the latest one exactly:
params, optimizer, step, data position), ``best/`` (the best-on-validation
network), ``export/child`` (the final trained network alone) and
``summary.json``. What is trained and how it is scored comes from the run's
Task (``hkt_jax.tasks``); logging, evaluation and checkpointing are periodic
hooks of the loop (``hkt_jax.hooks``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkt_jax import checkpoint, factories, hooks, preflight, sharding, stopping
from hkt_jax.cli import Interrupted, RunStopped, UserError
from hkt_jax.config import ExperimentConfig
from hkt_jax.methods import NEEDS_PARENT, child_variables, stage_split_for, trainable_variables
from hkt_jax.metrics import MetricsWriter
from hkt_jax.models import parameter_count
from hkt_jax.tasks import Task, make_task


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# -- steps ------------------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    task: Task | None = None, *, skip_nonfinite: bool = False):
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
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux["batch_stats"],
                                  opt_state=opt_state)
        if skip_nonfinite:
            keep_old = nonfinite != 0
            new_state = jax.tree.map(lambda new, old: jnp.where(keep_old, old, new), new_state,
                                     state.replace(step=state.step + 1))
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
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=init_variables["batch_stats"],
                      opt_state=tx.init(params))


def compile_steps(*, task: Task, model: nn.Module, loss_fn: Callable, tx, schedule, parent_variables: Any,
                  mesh, state: TrainState, shard_trainable: bool = False, parent_min_elements: int | None = None,
                  skip_nonfinite: bool = False):
    """jit the train and eval steps over the mesh: batch split over the devices,
    trainable state replicated (or sharded, ``shard_trainable``), the parent
    replicated (or FSDP-sharded over ``model``); the train state is donated."""
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state_sh = sharding.state_shardings(state, mesh, shard_trainable=shard_trainable)
    parent_kwargs = {} if parent_min_elements is None else {"min_elements": parent_min_elements}
    parent_sh = sharding.parent_shardings(parent_variables, mesh, **parent_kwargs)
    train_step = jax.jit(
        make_train_step(sharding.gather_inside(loss_fn, mesh), tx, schedule, task, skip_nonfinite=skip_nonfinite),
        in_shardings=(state_sh, parent_sh, data), out_shardings=(state_sh, repl), donate_argnums=(0,),
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
    datasets: Any
    mesh: Any
    conv_impl: str
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation

    def evaluate_split(self, eval_step, params, batch_stats, split: str) -> dict[str, float]:
        return evaluate(self.task, eval_step, params, batch_stats, self.datasets.eval_batches(split), self.mesh)


def build_run(config: ExperimentConfig) -> Run:
    task = make_task(config.task, config)
    batch_size = config.train.batch_size
    mesh = factories.make_mesh(config.mesh.data, config.mesh.model, global_batch_size=batch_size)
    datasets = task.make_datasets(config.data, global_batch_size=batch_size, seed=config.train.seed)
    trained_cfg = config.parent if config.method == "parent" else config.child
    stage_split = stage_split_for(config.method, config.hkt.stage_split)
    conv_impl = factories.conv_impl_for_mesh(trained_cfg.conv_impl, mesh)
    compute_dtype = config.train.compute_dtype
    model, spec = factories.make_model(trained_cfg, task.model_kwargs(datasets), stage_split=stage_split,
                                       conv_impl=conv_impl, compute_dtype=compute_dtype)
    parent = parent_variables = None
    parent_info: dict[str, Any] = {}
    if config.method in NEEDS_PARENT:
        if not config.parent_ckpt:
            raise ValueError(f"method={config.method!r} needs a parent: set parent_ckpt=DIR")
        parent, parent_variables, parent_spec = factories.load_parent(
            config.parent_ckpt, stage_split=stage_split, conv_impl=factories.conv_impl_for_mesh(
                config.parent.conv_impl, mesh), expected_kwargs=task.model_kwargs(datasets),
            compute_dtype=compute_dtype)
        parent_info = {"dir": str(config.parent_ckpt), **parent_spec}
    if config.method == "hkt":
        model, parent = factories.tap_models(model, parent, config.hkt.child_taps, config.hkt.parent_taps)
    loss_fn, init_variables = factories.make_method(
        config.method, model, task, task.example_input(datasets), jax.random.key(config.train.seed),
        parent=parent, parent_variables=parent_variables, hkt=config.hkt, kd=config.kd, fitnet=config.fitnet,
        at=config.at,
        freeze_batch_norm=config.train.freeze_batch_norm)
    if config.init_ckpt:
        init_variables = factories.start_from(init_variables, config.init_ckpt, spec)
    steps_per_epoch = max(1, datasets.num_train // batch_size)
    total_steps = config.train.steps or math.ceil(config.train.epochs * steps_per_epoch)
    tx, schedule = factories.make_optimization(config.optim, steps_per_epoch, total_steps, spec)
    return Run(config, task, model, spec, loss_fn, parent_variables if parent_variables is not None else {},
               parent_info, init_variables, datasets, mesh, conv_impl, steps_per_epoch, total_steps, schedule, tx)


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


# -- the loop ---------------------------------------------------------------------------------------


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path, *, allow_config_change: bool = False) -> dict:
    """Train (or resume) one run in ``workdir``; returns the final summary.

    Stops early with ``cli.RunStopped`` (after saving what it can): ``Interrupted``
    on SIGINT/SIGTERM (checkpoint of the finished step), ``NonFiniteError`` at a
    non-finite step (nothing of it saved), ``CheckpointSaveError``. Bad input is a
    ``cli.UserError`` raised before the workdir is created.
    """
    workdir = Path(workdir)
    changed = preflight.check_config_change(config, workdir, allow_config_change)
    try:
        run = build_run(config)
    except UserError:
        raise
    except (ValueError, OSError) as error:  # a config value, data file or parent checkpoint the user can fix
        raise UserError(str(error)) from error
    state = initial_state(run.init_variables, run.tx)
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.training_manager(workdir)
    shard_trainable = config.mesh.shard_trainable
    state_sh = sharding.state_shardings(state, run.mesh, shard_trainable=shard_trainable)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    restored = checkpoint.restore_latest_readable(manager, abstract)
    loop_state: dict[str, Any] = {}
    if restored is not None:
        state, loop_state = restored.state, restored.loop
        run.datasets.train.set_state(restored.data)
    else:
        state = sharding.put(state, state_sh)
    parent_variables = sharding.put(run.parent_variables, sharding.parent_shardings(run.parent_variables, run.mesh))
    train_step, eval_step = compile_steps(
        task=run.task, model=run.model, loss_fn=run.loss_fn, tx=run.tx, schedule=run.schedule,
        parent_variables=run.parent_variables, mesh=run.mesh, state=state, shard_trainable=shard_trainable,
        skip_nonfinite=config.train.skip_nonfinite_steps > 0)
    start_step = int(state.step)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / preflight.CONFIG_FILE).write_text(json.dumps(config.record(), indent=2, default=str))
        print(hooks.startup_block(run, workdir, start_step), flush=True)
        if changed:
            print("  config changed since this workdir was started: " + ", ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
    guard = stopping.NonFiniteGuard(config.train.skip_nonfinite_steps, run.total_steps, str(manager.directory))
    guard.load_state_dict(loop_state.get("nonfinite", {}))
    writer = MetricsWriter(workdir, resume_step=start_step)
    batches = sharding.DevicePrefetch(run.datasets.train, run.mesh)

    def current_loop_state() -> dict[str, Any]:
        hook_states = {type(h).__name__: h.state_dict() for h in loop_hooks}
        return {"nonfinite": guard.state_dict(), "hooks": {k: v for k, v in hook_states.items() if v is not None}}

    loop_hooks = hooks.default_hooks(run, workdir, writer, manager, eval_step, start_step, current_loop_state,
                                     batches.position)
    for hook in loop_hooks:
        if type(hook).__name__ in loop_state.get("hooks", {}):
            hook.load_state_dict(loop_state["hooks"][type(hook).__name__])
    saver = next(h for h in loop_hooks if isinstance(h, hooks.Checkpoint))

    def last_good_checkpoint() -> int | None:
        saver.wait()  # a save in flight is of a step that passed the check, before the bad one
        return manager.latest_step()

    # The device is never waited for step by step: the steps' non-finite flags are read back only where the
    # loop fetches anyway (a hook's logging window, evaluation, checkpoint; a stop) and always before it.
    try:
        with stopping.StopOnSignal() as stop:
            for step in range(start_step, run.total_steps):
                done = step + 1
                state, metrics = train_step(state, parent_variables, next(batches))
                guard.record(done, metrics.pop("nonfinite"))
                if hooks.any_due(loop_hooks, done):
                    guard.check_recorded(last_good_checkpoint)
                hooks.run_hooks(loop_hooks, done, state, metrics)
                signum = stop.agreed(done)
                if signum and done < run.total_steps:
                    guard.check_recorded(last_good_checkpoint)
                    saver.save(done, state)
                    raise Interrupted(
                        f"stopped by {signal.Signals(signum).name} at step {done} of {run.total_steps}; "
                        f"checkpoint saved in {manager.directory / str(done)}. Rerun the same command to "
                        f"continue from step {done}", signum)
            guard.check_recorded(last_good_checkpoint)  # a no-op: every hook is due at the last step
        _close_all(loop_hooks)  # the last checkpoint is written (or its failure raised) before anything is exported
    except BaseException as stopped:  # a stop, a failed save, a bug: close what is open (finishing saves)
        try:
            _close_all((*loop_hooks, writer, manager))
        except Exception:
            if isinstance(stopped, RunStopped):  # e.g. the checkpoint this stop saved failed: that is the news
                raise
        raise
    summary = summarize(run, state, eval_step, workdir, loop_hooks)
    if config.train.skip_nonfinite_steps:
        summary["skipped_nonfinite_steps"] = guard.skipped
    export(workdir / "export" / "child", run, state, {"step": int(state.step), **summary})
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    manager.close()
    return summary


def _close_all(closeables) -> None:
    """Close each one even when an earlier one fails (a failed save surfaces here); then raise the first error."""
    errors = []
    for closeable in closeables:
        try:
            closeable.close()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def export(directory: Path, run: Run, state: TrainState, metadata: dict[str, Any]) -> None:
    """The trained network alone, with what it was trained on (so a later run can check it as a parent).
    Variables are float32 whatever ``train.compute_dtype`` was; the metadata records that dtype."""
    variables = jax.device_get(child_variables(state.params, state.batch_stats))
    data = {"task": run.task.name, "source": run.config.data.source, "name": run.config.data.name}
    trained = {"data": data, "compute_dtype": run.config.train.compute_dtype}
    # Every process calls orbax (its save is a collective); only process 0 writes files.
    checkpoint.save_model(directory, variables, {**run.spec, "metadata": {**trained, **metadata}})


def summarize(run: Run, state: TrainState, eval_step, workdir: Path, loop_hooks) -> dict[str, Any]:
    """Final numbers; evaluations the loop already made at the last step are reused,
    and the best network is only re-evaluated when it is not the final one."""
    metric = run.task.selection_metric
    final_step = int(state.step)
    final_vars = child_variables(state.params, state.batch_stats)
    test = run.evaluate_split(eval_step, state.params, state.batch_stats, "test")
    summary: dict[str, Any] = {
        "method": run.config.method,
        "task": run.task.name,
        "steps": final_step,
        f"final_test_{metric}": test[metric],
        "final_test": test,
        "parameters": parameter_count(final_vars["params"]),
        "inference_ms_per_image": inference_ms_per_image(run.model, final_vars,
                                                         run.task.example_input(run.datasets, 128)),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
    }
    evaluation = next((h for h in loop_hooks if isinstance(h, hooks.EvaluateAndKeepBest)), None)
    if evaluation is None:
        return summary
    final_validation = evaluation.last_result if evaluation.last_step == final_step else None
    if final_validation is None:  # a finished run restarted: the loop did not run
        final_validation = run.evaluate_split(eval_step, state.params, state.batch_stats, "validation")
    best = evaluation.best
    summary[f"final_validation_{metric}"] = final_validation[metric]
    summary[f"best_validation_{metric}"] = best.get("value")
    summary["best_step"] = best.get("step")
    if best.get("step") == final_step:
        summary[f"best_test_{metric}"] = test[metric]
        summary["best_test"] = test
    elif best:
        best_vars, _ = checkpoint.load_model(workdir / "best")
        best_trainable = trainable_variables(sharding.put_replicated(best_vars, run.mesh))
        # In the train state's trees (adapters kept, unused by evaluation): the eval step is not traced again.
        params = {**state.params, **best_trainable["params"]}
        batch_stats = {**state.batch_stats, **best_trainable["batch_stats"]}
        summary["best_test"] = run.evaluate_split(eval_step, params, batch_stats, "test")
        summary[f"best_test_{metric}"] = summary["best_test"][metric]
    return summary
