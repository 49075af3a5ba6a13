"""Train state, jit-compiled train/eval steps, and the one restartable training loop every task uses.

``train_and_evaluate(config, workdir)`` trains one network (the child, or a
parent from scratch) and leaves in ``workdir``: ``metrics.jsonl``, TensorBoard
events, orbax checkpoints (rerunning resumes from the latest one exactly:
params, optimizer, step, data position), ``best/`` (the best-on-validation
network), ``export/child`` (the final trained network alone) and
``summary.json``. What is trained and how it is scored comes from the run's
Task (``hkt_jax.tasks``); logging, evaluation and checkpointing are periodic
hooks of the loop (``hkt_jax.training.hooks``).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import jax

from hkt_jax.training import checkpoint, hooks, preflight, sharding, stopping
from hkt_jax.training.faults import Interrupted, RunStopped, UserError
from hkt_jax.training.config import ExperimentConfig
from hkt_jax.training.methods import child_variables, trainable_variables
from hkt_jax.training.metrics import MetricsWriter
from hkt_jax.training.run import (
    Run,
    TrainState,
    build_run,
    compile_steps,
    export,
    inference_ms_per_image,
    initial_state,
)
from hkt_jax.models import parameter_count


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
        task=run.task,
        model=run.model,
        loss_fn=run.loss_fn,
        tx=run.tx,
        schedule=run.schedule,
        parent_variables=run.parent_variables,
        mesh=run.mesh,
        state=state,
        shard_trainable=shard_trainable,
        skip_nonfinite=config.train.skip_nonfinite_steps > 0,
    )
    start_step = int(state.step)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / preflight.CONFIG_FILE).write_text(json.dumps(config.record(), indent=2, default=str))
        print(hooks.startup_block(run, workdir, start_step), flush=True)
        if changed:
            print(
                "  config changed since this workdir was started: "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
                flush=True,
            )
    guard = stopping.NonFiniteGuard(config.train.skip_nonfinite_steps, run.total_steps, str(manager.directory))
    guard.load_state_dict(loop_state.get("nonfinite", {}))
    writer = MetricsWriter(workdir, resume_step=start_step)
    batches = sharding.DevicePrefetch(run.datasets.train, run.mesh)

    def current_loop_state() -> dict[str, Any]:
        hook_states = {type(h).__name__: h.state_dict() for h in loop_hooks}
        return {"nonfinite": guard.state_dict(), "hooks": {k: v for k, v in hook_states.items() if v is not None}}

    loop_hooks = hooks.default_hooks(
        run, workdir, writer, manager, eval_step, start_step, current_loop_state, batches.position
    )
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
                        f"continue from step {done}",
                        signum,
                    )
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
        "inference_ms_per_image": inference_ms_per_image(
            run.model, final_vars, run.task.example_input(run.datasets, 128)
        ),
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
