"""Train state, jit-compiled train/eval steps, and the restartable training loop.

``train_and_evaluate(config, workdir, parent_dir=...)`` trains one network
(the child, or a parent from scratch) and leaves in ``workdir``:
``metrics.jsonl``, TensorBoard events, orbax checkpoints (rerunning resumes
from the latest one exactly: params, optimizer, step, RNG, data position),
``best/`` (the best-on-validation network), ``export/child`` (the final
trained network alone) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
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
from tqdm.auto import tqdm

from hkt_jax import checkpoint, fold, sharding
from hkt_jax.config import ExperimentConfig, OptimConfig
from hkt_jax.data import make_datasets
from hkt_jax.hkt import HKT, Boundary, HKTConfig
from hkt_jax.methods import child_variables, hkt_loss, kd_loss, plain_loss, trainable_variables
from hkt_jax.metrics import MetricsWriter
from hkt_jax.models import build_model, model_spec, parameter_count


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold a plain array


# -- optimisation -----------------------------------------------------------------------------------


def make_schedule(optim: OptimConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    if optim.schedule == "multistep":
        boundaries = {int(m * steps_per_epoch): optim.decay_factor for m in optim.milestones}
        return optax.piecewise_constant_schedule(optim.learning_rate, boundaries)
    if optim.schedule == "cosine":
        warmup = int(optim.warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
        )
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.learning_rate)
    raise ValueError(f"optim.schedule must be 'multistep', 'cosine' or 'constant', got {optim.schedule!r}")


def make_optimizer(optim: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD as PyTorch does it: weight decay added to the gradient, then momentum."""
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
    )


# -- steps ------------------------------------------------------------------------------------------


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule):
    """One optimizer step. Differentiates w.r.t. ``state.params`` only: the parent
    variables are an input, never a gradient target."""

    def train_step(state: TrainState, parent_variables: Any, batch: dict[str, jax.Array]):
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, aux), grads = grad_fn(state.params, state.batch_stats, parent_variables, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(aux["metrics"])
        metrics["accuracy"] = jnp.mean(jnp.argmax(aux["logits"], -1) == batch["label"])
        metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=aux["batch_stats"], opt_state=opt_state,
            rng=jax.random.key_data(rng),
        )
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module):
    """Masked sums (correct, loss, count) of the network alone, in inference mode."""

    def eval_step(params, batch_stats, batch):
        logits = model.apply(child_variables(params, batch_stats), batch["image"], train=False)
        logits = logits.astype(jnp.float32)
        mask = batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

    return eval_step


def evaluate_split(run: "Run", eval_step, params, batch_stats, split: str) -> dict[str, float]:
    """Accuracy and mean loss of the network on a whole eval split of the run's data."""
    return evaluate(eval_step, params, batch_stats, run.datasets.eval_batches(split), run.mesh)


def evaluate(eval_step, params, batch_stats, batches, mesh) -> dict[str, float]:
    totals = None
    for batch in batches:
        sums = eval_step(params, batch_stats, sharding.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count}


# -- set-up -----------------------------------------------------------------------------------------


def _staged_model(spec: dict[str, Any], stage_split: str) -> nn.Module:
    """Rebuild a model from its spec with the run's stage split (when it has one)."""
    fields = {f.name for f in dataclasses.fields(build_model(spec))}
    return build_model(spec, **({"stage_split": stage_split} if "stage_split" in fields else {}))


def load_parent(parent_dir: str | Path, stage_split: str, num_classes: int) -> tuple[nn.Module, Any]:
    variables, spec = checkpoint.load_model(parent_dir)
    parent = _staged_model(spec, stage_split)
    parent_classes = spec.get("kwargs", {}).get("num_classes")
    if parent_classes is not None and parent_classes != num_classes:
        raise ValueError(f"parent at {parent_dir} predicts {parent_classes} classes but the data has {num_classes}")
    return parent, variables


def hkt_engine_config(config: ExperimentConfig, num_stages: int) -> HKTConfig:
    settings = config.hkt
    num_boundaries = num_stages - 1
    flags = {}
    for name in ("backbone", "head"):
        values = getattr(settings, name) or (True,) * num_boundaries
        if len(values) != num_boundaries:
            raise ValueError(f"hkt.{name} has {len(values)} entries; this stage split has {num_boundaries} boundaries")
        flags[name] = values
    boundaries = tuple(Boundary(backbone=b, head=h) for b, h in zip(flags["backbone"], flags["head"]))
    return HKTConfig(
        lam=settings.lam, mode=settings.mode, chunk_size=settings.chunk_size, impl=settings.impl, alphas=tuple(settings.alphas),
        inherit_loss=settings.inherit_loss, boundaries=boundaries,
    )


def inference_ms_per_image(model: nn.Module, variables: Any, batch_size: int = 128, repeats: int = 5) -> float:
    """Median wall time of the jit-compiled network alone, per image."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.zeros((batch_size, 32, 32, 3), jnp.float32)
    apply(variables, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        apply(variables, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times)) / batch_size


@dataclasses.dataclass
class Run:
    """Everything one training run is built from (exposed for benchmarks and tests)."""

    model: nn.Module
    spec: dict[str, Any]
    loss_fn: Callable
    parent_variables: Any
    init_variables: dict[str, Any]
    datasets: Any
    mesh: Any
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    tx: optax.GradientTransformation


def build_run(config: ExperimentConfig, parent_dir: str | Path | None = None) -> Run:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
    batch_size = config.train.batch_size
    sharding.check_global_batch(batch_size, mesh)
    datasets = make_datasets(config.data, global_batch_size=batch_size, seed=config.train.seed)
    num_classes = datasets.num_classes
    trained_cfg = config.parent if config.method == "parent" else config.child
    stage_split = config.hkt.stage_split if config.method == "hkt" else "paper"
    spec = model_spec(trained_cfg.arch, **trained_cfg.kwargs(num_classes))
    model = _staged_model(spec, stage_split)
    rng = jax.random.key(config.train.seed)
    sample = jnp.zeros((2, 32, 32, 3), jnp.float32)

    parent_variables: Any = {}
    if config.method in ("hkt", "kd"):
        if parent_dir is None:
            raise ValueError(f"method={config.method!r} needs a parent: set parent_ckpt=DIR")
        parent, parent_variables = load_parent(parent_dir, stage_split, num_classes)
        # Frozen and always in inference mode: fold its BatchNorm into the convs (same function, fewer ops).
        parent, parent_variables = fold.fold_parent(parent, parent_variables)
    if config.method == "hkt":
        engine = HKT(model, parent, hkt_engine_config(config, len(model.stage_names)))
        init_variables = engine.init(rng, sample, parent_variables)
        loss_fn = hkt_loss(engine)
    else:
        init_variables = trainable_variables(model.init(rng, sample, train=False))
        if config.method == "kd":
            loss_fn = kd_loss(model, parent, temperature=config.kd.temperature, weight=config.kd.weight)
        else:
            loss_fn = plain_loss(model)

    steps_per_epoch = max(1, datasets.num_train // batch_size)
    total_steps = config.train.steps or math.ceil(config.train.epochs * steps_per_epoch)
    schedule = make_schedule(config.optim, steps_per_epoch, total_steps)
    tx = make_optimizer(config.optim, schedule)
    return Run(model, spec, loss_fn, parent_variables, init_variables, datasets, mesh, steps_per_epoch,
               total_steps, schedule, tx)


def initial_state(run: Run, seed: int) -> TrainState:
    params = run.init_variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=run.init_variables["batch_stats"],
        opt_state=run.tx.init(params), rng=jax.random.key_data(jax.random.key(seed + 1)),
    )


def compile_steps(run: Run, state: TrainState, *, shard_trainable: bool = False):
    """jit the train and eval steps over the mesh: batch split over the devices,
    trainable state replicated (or sharded, ``shard_trainable``), the parent
    replicated (or FSDP-sharded over ``model``); the train state is donated."""
    repl, data = sharding.replicated(run.mesh), sharding.batch_sharding(run.mesh)
    state_sh = sharding.state_shardings(state, run.mesh, shard_trainable=shard_trainable)
    parent_sh = sharding.parent_shardings(run.parent_variables, run.mesh)
    train_step = jax.jit(
        make_train_step(sharding.gather_inside(run.loss_fn, run.mesh), run.tx, run.schedule),
        in_shardings=(state_sh, parent_sh, data), out_shardings=(state_sh, repl), donate_argnums=(0,),
    )
    # Eval also takes the best exported network (child params only): sharded params keep their own layout.
    eval_in = {} if shard_trainable else {"in_shardings": (repl, repl, data)}
    eval_step = jax.jit(make_eval_step(run.model), out_shardings=repl, **eval_in)
    return train_step, eval_step


# -- the loop ---------------------------------------------------------------------------------------


def _export(directory: Path, run: Run, state: TrainState, metadata: dict[str, Any]) -> None:
    variables = jax.device_get(child_variables(state.params, state.batch_stats))
    # Every process calls orbax (its save is a collective); only process 0 writes files.
    checkpoint.save_model(directory, variables, {**run.spec, "metadata": metadata})


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path, parent_dir: str | Path | None = None) -> dict:
    """Train (or resume) one run in ``workdir``; returns the final summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build_run(config, parent_dir)
    state = initial_state(run, config.train.seed)
    manager = checkpoint.training_manager(workdir)
    shard_trainable = config.mesh.shard_trainable
    state_sh = sharding.state_shardings(state, run.mesh, shard_trainable=shard_trainable)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    restored = checkpoint.restore_training(manager, abstract)
    if restored is not None:
        state, data_state = restored
        run.datasets.train.set_state(data_state)
    else:
        state = sharding.put(state, state_sh)
    parent_variables = sharding.put(run.parent_variables, sharding.parent_shardings(run.parent_variables, run.mesh))
    train_step, eval_step = compile_steps(run, state, shard_trainable=shard_trainable)
    start_step = int(state.step)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))
    writer = MetricsWriter(workdir, resume_step=start_step)
    eval_every = config.train.eval_every_steps or run.steps_per_epoch
    has_validation = run.datasets.num_validation > 0
    best = checkpoint.load_model_spec(workdir / "best").get("metadata", {}) if (workdir / "best").exists() else {}

    def validate(step):
        result = evaluate_split(run, eval_step, state.params, state.batch_stats, "validation")
        writer.write(step, {"eval_accuracy": result["accuracy"], "eval_loss": result["loss"], "split": "validation"})
        return result

    progress = tqdm(total=run.total_steps, initial=start_step, disable=not is_main, desc=config.method,
                    unit="step", dynamic_ncols=True)
    window, window_start = [], time.perf_counter()
    final_validation = None  # the last step's validation accuracy, reused by the summary
    for step in range(start_step, run.total_steps):
        batch = sharding.global_batch(next(run.datasets.train), run.mesh)
        state, metrics = train_step(state, parent_variables, batch)
        if window:  # keep one step in flight, so the progress bar shows real speed
            jax.block_until_ready(window[-1])
        window.append(metrics)
        done = step + 1
        if done % config.train.log_every_steps == 0 or done == run.total_steps:
            means = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
            elapsed = time.perf_counter() - window_start
            means["img_per_s"] = len(window) * config.train.batch_size / elapsed
            row = writer.write(done, means)
            progress.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}",
                                 img_s=f"{row['img_per_s']:.0f}")
            window, window_start = [], time.perf_counter()
        if has_validation and (done % eval_every == 0 or done == run.total_steps):
            accuracy = validate(done)["accuracy"]
            final_validation = accuracy if done == run.total_steps else None
            if accuracy > best.get("validation_accuracy", -1.0):
                best = {"validation_accuracy": accuracy, "step": done}
                _export(workdir / "best", run, state, best)
            window_start = time.perf_counter()
        if done % config.train.checkpoint_every_steps == 0 or done == run.total_steps:
            checkpoint.save_training(manager, done, state, run.datasets.train.get_state())
            window_start = time.perf_counter()
        progress.update(1)
    progress.close()

    summary = _summarize(config, run, state, eval_step, workdir, best, has_validation, final_validation)
    _export(workdir / "export" / "child", run, state, {"step": int(state.step), **summary})
    if is_main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    writer.close()
    manager.close()
    return summary


def _summarize(config, run, state, eval_step, workdir, best, has_validation, final_validation) -> dict[str, Any]:
    """Final numbers; evaluations the loop already made at the last step are reused,
    and the best child is only re-evaluated when it is not the final one."""
    def test_accuracy(params, batch_stats):
        return evaluate_split(run, eval_step, params, batch_stats, "test")["accuracy"]

    final_step = int(state.step)
    final_vars = child_variables(state.params, state.batch_stats)
    summary: dict[str, Any] = {
        "method": config.method,
        "steps": final_step,
        "final_test_accuracy": test_accuracy(state.params, state.batch_stats),
        "parameters": parameter_count(final_vars["params"]),
        "inference_ms_per_image": inference_ms_per_image(run.model, final_vars),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    if has_validation:
        if final_validation is None:  # a finished run restarted: the loop did not run
            final_validation = evaluate_split(run, eval_step, state.params, state.batch_stats, "validation")["accuracy"]
        summary["final_validation_accuracy"] = final_validation
        summary["best_validation_accuracy"] = best.get("validation_accuracy")
        summary["best_step"] = best.get("step")
        if best.get("step") == final_step:
            summary["best_test_accuracy"] = summary["final_test_accuracy"]
        elif best:
            best_vars, _ = checkpoint.load_model(workdir / "best")
            best_trainable = trainable_variables(sharding.put_replicated(best_vars, run.mesh))
            summary["best_test_accuracy"] = test_accuracy(best_trainable["params"], best_trainable["batch_stats"])
    return summary
