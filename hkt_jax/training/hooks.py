"""Periodic work of the training loop: logging, evaluation with best-model export, checkpoints, progress.

Each hook is called after every train step with ``(done_steps, state, metrics)``
and decides for itself whether this step is one of its steps; it returns True
when it did slow work (an eval pass, a checkpoint), so the speed measurement
can leave that time out. ``due(done)`` says beforehand whether the hook will
read the state or metrics back to the host (or save them) at that step: the
loop then first checks the steps' non-finite flags, which otherwise stay on the
device (no per-step wait). The loop in ``hkt_jax.training.train`` knows nothing else.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hkt_jax.tasks.base import Task
from hkt_jax.training import checkpoint, sharding, stopping
from hkt_jax.training.run import export, make_predict
from hkt_jax.runtime import compile_cache
from hkt_jax.models import parameter_count
from hkt_jax.training.optim import describe_schedule


class Hook:
    def __call__(self, done: int, state: Any, metrics: dict[str, Any]) -> bool:
        return False

    def due(self, done: int) -> bool:
        """Whether the call for step ``done`` reads values back from the device, saves or exports."""
        return False

    def resume_timing(self) -> None:
        """Called after another hook's slow work."""

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """What this hook needs to carry on exactly after a resume (saved in each checkpoint), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _due(done: int, every: int | None, total: int) -> bool:
    return done == total or bool(every) and done % every == 0


# Counted over a logging window rather than averaged.
SUMMED_METRICS = ("skipped_steps",)


class LogMetrics(Hook):
    """Mean train metrics over each logging window (and img/s) -> metrics.jsonl, TensorBoard, progress bar.

    The window of a checkpoint taken between two log steps is saved with it, so a
    resumed run logs the same rows as an uninterrupted one. Until the first window, the bar shows the
    first step's loss (one fetch per run, not one per step)."""

    def __init__(self, writer, every: int, total: int, batch_size: int, progress):
        self.writer, self.every, self.total, self.batch_size, self.progress = writer, every, total, batch_size, progress
        self.window: list[dict[str, Any]] = []
        self.window_start = time.perf_counter()
        self.first_loss_shown = False

    def _show_first_loss(self, done: int, loss: Any) -> None:
        """The bar's loss until the first window: this process's first step's, fetched once (that step has
        compiled and run by now). Later steps are not peeked at: the host dispatches steps ahead of the device
        up to the window's fetch, so their losses would arrive only while it waits there anyway."""
        self.first_loss_shown = True
        if self.progress.disable or not isinstance(loss, jax.Array) or not loss.is_fully_replicated:
            return
        value = float(np.asarray(loss.addressable_data(0)))  # this process's copy (multi-host: not addressable)
        self.progress.set_postfix(loss=f"{value:.3f} (step {done})" if np.isfinite(value) else f"nan (step {done})")

    def due(self, done):
        return _due(done, self.every, self.total)

    def __call__(self, done, state, metrics):
        # Metrics stay on the device until the window is fetched; that fetch waits for the window's last
        # step, so the time from the previous fetch to this one is the real throughput.
        self.window.append(metrics)
        if self.due(done):
            means = jax.device_get(
                {
                    key: (jnp.sum if key in SUMMED_METRICS else jnp.mean)(
                        jnp.stack([step[key] for step in self.window])
                    )
                    for key in self.window[0]
                }
            )
            means["img_per_s"] = len(self.window) * self.batch_size / (time.perf_counter() - self.window_start)
            row = self.writer.write(done, means)
            shown = {
                k: "nan" if row.get(k) is None else f"{row[k]:.3f}"  # None: non-finite (JSON has no NaN)
                for k in ("loss", "accuracy", "pixel_accuracy", "epe")
                if k in row
            }
            self.progress.set_postfix(**shown, img_s=f"{row['img_per_s']:.0f}")
            self.window, self.window_start = [], time.perf_counter()
            self.first_loss_shown = True
        elif not self.first_loss_shown and "loss" in metrics:
            self._show_first_loss(done, metrics["loss"])
        return False

    def resume_timing(self):
        self.window_start = time.perf_counter()

    def state_dict(self):
        window = jax.device_get(self.window)
        return {
            "window": [
                {k: {"dtype": str(np.asarray(v).dtype), "value": np.asarray(v).tolist()} for k, v in step.items()}
                for step in window
            ]
        }

    def load_state_dict(self, state):
        self.window = [
            {k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in step.items()} for step in state.get("window", [])
        ]


class EvaluateAndKeepBest(Hook):
    """Validation metrics every ``every`` steps; the best network by the task's selection metric -> ``best/``."""

    def __init__(self, run, workdir: Path, writer, eval_step, every: int, total: int):
        self.run, self.workdir, self.writer, self.eval_step = run, workdir, writer, eval_step
        self.every, self.total = every, total
        self.metric = run.task.selection_metric
        self.last_step, self.last_result = None, None
        metadata = {}
        if checkpoint.recover_model(workdir / "best"):
            metadata = checkpoint.load_model_spec(workdir / "best").get("metadata", {})
        # "value" (any task) or "validation_accuracy" (classification runs written before tasks existed).
        value = metadata.get("value", metadata.get(f"validation_{self.metric}"))
        self.best = {"value": value, "step": metadata.get("step")} if value is not None else {}

    def due(self, done):
        return _due(done, self.every, self.total)

    def __call__(self, done, state, metrics):
        if not self.due(done):
            return False
        result = self.run.evaluate_split(self.eval_step, state.params, state.batch_stats, "validation")
        self.writer.write(done, {**{f"eval_{k}": v for k, v in result.items()}, "split": "validation"})
        self.last_step, self.last_result = done, result
        if self.run.task.is_better(result[self.metric], self.best.get("value")):
            self.best = {"value": result[self.metric], "step": done}
            export(
                self.workdir / "best",
                self.run,
                state,
                {**self.best, "metric": self.metric, f"validation_{self.metric}": result[self.metric]},
            )
        return True


class LogImages(Hook):
    """The task's images (flow colours, segmentation overlays) of the first validation batch, written to
    TensorBoard with each evaluation; tasks without images (classification) get no such hook."""

    def __init__(self, run, writer, every: int, total: int):
        self.run, self.writer, self.every, self.total = run, writer, every, total
        self.batch = next(iter(run.datasets.eval_batches("validation")))
        self.global_batch = sharding.global_batch(self.batch, run.mesh)
        self.predict = jax.jit(make_predict(run.model, run.task))

    def due(self, done):
        return _due(done, self.every, self.total)

    def __call__(self, done, state, metrics):
        if not self.due(done):
            return False
        outputs = self.predict(state.params, state.batch_stats, self.global_batch)
        if jax.process_count() > 1:  # process 0's examples lead the global batch
            from jax.experimental import multihost_utils

            outputs = multihost_utils.process_allgather(outputs, tiled=True)
        if jax.process_index() == 0:
            self.writer.write_images(done, self.run.task.images_to_log(jax.device_get(outputs), self.batch))
        return True


def has_images(task) -> bool:
    return type(task).images_to_log is not Task.images_to_log


TIME_SYNC_STEPS = 10


class Checkpoint(Hook):
    """The resumable train state, data position and loop state every ``every`` steps, every
    ``every_minutes`` minutes (0: never by time) and at the end; ``save`` also serves a stop request.

    Saves are asynchronous: each waits for the previous one (long finished, usually), so a failed save is
    reported at the next save or at ``close`` at the latest, naming its step. ``data_state`` gives the
    data position after the last batch the saved step consumed (batches prefetched beyond it are not
    counted); the iterator's own position by default."""

    def __init__(
        self, run, manager, every: int, total: int, every_minutes: float = 0.0, loop_state=None, data_state=None
    ):
        self.run, self.manager, self.every, self.total = run, manager, every, total
        self.every_seconds = 60.0 * every_minutes
        self.loop_state = loop_state or (lambda: None)
        self.data_state = data_state or run.datasets.train.get_state
        self.last_saved_step = manager.latest_step()
        self.last_save_time = time.monotonic()
        self.pending: checkpoint.PendingSave | None = None
        self._decision: tuple[int | None, bool] = (None, False)

    def due(self, done):
        # Decided once per step: on several processes the time check is a collective (every TIME_SYNC_STEPS).
        if self._decision[0] != done:
            by_time = (
                bool(self.every_seconds)
                and (jax.process_count() == 1 or done % TIME_SYNC_STEPS == 0)
                and stopping.time_is_due(time.monotonic() - self.last_save_time >= self.every_seconds)
            )
            self._decision = (done, _due(done, self.every, self.total) or by_time)
        return self._decision[1]

    def __call__(self, done, state, metrics):
        if not self.due(done):
            return False
        self.save(done, state)
        return True

    def save(self, done, state) -> None:
        if self.last_saved_step == done:
            return
        self.wait()
        self.pending = checkpoint.save_training(self.manager, done, state, self.data_state(), self.loop_state())
        self.last_saved_step, self.last_save_time = done, time.monotonic()

    def wait(self) -> None:
        """Until the last save is written; its failure raises ``CheckpointSaveError`` (once)."""
        pending, self.pending = self.pending, None
        checkpoint.finish_save(self.manager, pending)

    def close(self):
        self.wait()


class Progress(Hook):
    def __init__(self, progress):
        self.progress = progress

    def __call__(self, done, state, metrics):
        self.progress.update(1)
        return False

    def close(self):
        self.progress.close()


def default_hooks(
    run, workdir: Path, writer, manager, eval_step, start_step: int, loop_state=None, data_state=None
) -> list[Hook]:
    train = run.config.train
    total = run.total_steps
    progress = tqdm(
        total=total,
        initial=start_step,
        disable=jax.process_index() != 0,
        desc=run.config.method,
        unit="step",
        dynamic_ncols=True,
    )
    hooks: list[Hook] = [LogMetrics(writer, train.log_every_steps, total, train.batch_size, progress)]
    if run.datasets.num_validation > 0:
        eval_every = train.eval_every_steps or run.steps_per_epoch
        hooks.append(EvaluateAndKeepBest(run, workdir, writer, eval_step, eval_every, total))
        if has_images(run.task):
            hooks.append(LogImages(run, writer, eval_every, total))
    hooks += [
        Checkpoint(
            run, manager, train.checkpoint_every_steps, total, train.checkpoint_every_minutes, loop_state, data_state
        ),
        Progress(progress),
    ]
    return hooks


def any_due(hooks: list[Hook], done: int) -> bool:
    """Whether some hook reads back or saves at step ``done`` (every hook is asked: some decide collectively)."""
    return any([hook.due(done) for hook in hooks])


def run_hooks(hooks: list[Hook], done: int, state: Any, metrics: dict[str, Any]) -> None:
    if any([hook(done, state, metrics) for hook in hooks]):
        for hook in hooks:
            hook.resume_timing()


# -- what a run says at start-up --------------------------------------------------------------------


def _model_line(spec: dict[str, Any], params: Any) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("kwargs", {}).items()))
    return f"{spec.get('arch')}({kwargs}), {parameter_count(params):,} parameters"


def parent_data_mismatch(parent_info: dict[str, Any], run_data: dict[str, str]) -> str | None:
    """Why the parent's training data differs from this run's, or None when they agree or it is unknown."""
    metadata = parent_info.get("metadata", {})
    if "converted_from" in metadata:
        trained_on = {"source": "real (converted PyTorch checkpoint)", "name": "cifar10"}
    elif "data" in metadata:
        trained_on = metadata["data"]
    else:
        return None
    synthetic_run, synthetic_parent = run_data["source"] == "synthetic", trained_on.get("source") == "synthetic"
    if trained_on.get("name") != run_data["name"] or synthetic_run != synthetic_parent:
        return (
            f"the parent was trained on {trained_on.get('source')} {trained_on.get('name')} data but this run "
            f"uses {run_data['source']} {run_data['name']}: its features may not help this child"
        )
    return None


def hkt_line(hkt) -> str:
    """The HKT settings a run trains with, in the paper's symbols."""
    alphas = ", ".join(f"{a:.3g}" for a in hkt.alphas)
    parts = [
        f"hkt:    lambda={hkt.lam:g}, alphas=({alphas}), GA mode={hkt.mode} (impl {hkt.impl}), "
        f"L1/L3={hkt.inherit_loss}, head anchored on the {hkt.head_anchor}, split={hkt.stage_split}"
    ]
    if hkt.native_target == "parent":
        parts.append("L2 distils from the parent's outputs (kd.temperature, kd.weight)")
    if hkt.stages is not None:
        parts.append(f"stages={hkt.stages}")
    if hkt.child_taps or hkt.parent_taps:
        parts.append(
            f"taps child {','.join(hkt.child_taps) or '(own stages)'} / parent "
            f"{','.join(hkt.parent_taps) or '(own stages)'}"
        )
    return "; ".join(parts)


def startup_block(run, workdir: Path, start_step: int) -> str:
    """One compact block saying what this run uses (printed before the first step)."""
    config = run.config
    trained = {"params": run.init_variables["params"]["child"]}
    lines = [
        f"hkt_jax: method={config.method} task={run.task.name} workdir={workdir}",
        f"  {'parent' if config.method == 'parent' else 'child'}:  {_model_line(run.spec, trained['params'])}",
    ]
    adapters = run.init_variables["params"].get("adapters")
    if adapters is not None:
        count = parameter_count(adapters)
        kind = "FitNet regressor" if config.method == "fitnet" else "Transfer"
        lines.append(
            f"  adapters: {count:,} {kind} parameters (trained, not exported)"
            if count
            else "  adapters: none (parent and child widths match at every boundary: Transfer is the identity)"
        )
    if run.parent_info:
        meta = run.parent_info.get("metadata", {})
        origin = (
            f"converted from {meta['converted_from']}"
            if "converted_from" in meta
            else f"trained here ({meta['data'].get('source')} {meta['data'].get('name')})"
            if "data" in meta
            else "origin not recorded"
        )
        score = {k: v for k, v in meta.items() if k in ("best_prec1", "final_test_accuracy", "best_test_accuracy")}
        lines.append(
            f"  parent: {_model_line(run.parent_info, run.parent_variables['params'])}, frozen, from "
            f"{run.parent_info['dir']} ({origin}{', ' + str(score) if score else ''})"
        )
    data = config.data
    lines.append(f"  data:   {data.source} {data.name}: {run.task.describe_data(run.datasets)}")
    devices = run.mesh.devices
    lines.append(
        f"  mesh:   {devices.size} x {devices.flat[0].platform} {dict(run.mesh.shape)}; "
        f"conv_impl={run.conv_impl}; compute_dtype={config.train.compute_dtype}"
    )
    lines.append(f"  optim:  {describe_schedule(config.optim, run.spec)}")
    lines.append(f"  {compile_cache.describe(compile_cache.current())}")
    resume = f"resuming from step {start_step} of {run.total_steps}" if start_step else "starting at step 0"
    lines.append(
        f"  steps:  {run.total_steps} ({run.steps_per_epoch} per epoch, global batch "
        f"{config.train.batch_size}); {resume}"
    )
    minutes = config.train.checkpoint_every_minutes
    lines.append(
        f"  checkpoints: every {config.train.checkpoint_every_steps} steps"
        f"{f', every {minutes:g} min' if minutes else ''}, on Ctrl-C/SIGTERM and at the end, in "
        f"{workdir / 'checkpoints'}; rerun the same command to resume"
    )
    skip = config.train.skip_nonfinite_steps
    lines.append(
        "  non-finite loss/gradients: "
        + (
            f"skip the update, up to {skip} in a row"
            if skip
            else "stop at the first (train.skip_nonfinite_steps=K skips)"
        )
    )
    if config.method == "hkt":
        lines.append("  " + hkt_line(config.hkt))
    lines += [f"  note: {note}" for note in run.task.startup_notes(config)]
    mismatch = (
        parent_data_mismatch(run.parent_info, {"source": data.source, "name": data.name}) if run.parent_info else None
    )
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
        lines.append(f"  WARNING: {mismatch}")
    return "\n".join(lines)
