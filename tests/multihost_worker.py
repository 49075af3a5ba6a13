"""Subprocess side of tests/test_sharding.py: runs HKT steps on a (simulated) device mesh.

    python -m tests.multihost_worker --devices 8 --task all --out R.json
    python -m tests.multihost_worker --devices 4 --coordinator localhost:PORT \
        --num_processes 2 --process_id I --task steps --workdir DIR --out R.json

``--devices`` must take effect before jax is imported (XLA_FLAGS), hence a
separate process. Importing this module does not import jax; the test imports
``hkt_steps`` from it to run the same code in-process on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from hkt_jax.training.run import compile_steps, initial_state

GLOBAL_BATCH = 16
IMAGE = 8
STEPS = 5
CLASSES = 3
CHILD_WIDTHS = (4, 6)
PARENT_WIDTHS = (16, 32)  # distinct from the child's: no parent shape can pass for a child one


def _models(parent_widths=PARENT_WIDTHS):
    from hkt_jax.engine.hkt import HKTConfig
    from hkt_jax.models import ToyStagedNet

    child = ToyStagedNet(widths=CHILD_WIDTHS, strides=(2, 1), num_classes=CLASSES)
    parent = ToyStagedNet(widths=parent_widths, strides=(1, 1), num_classes=CLASSES)
    config = HKTConfig(lam=0.6, mode="softmax", alphas=(0.25, 0.5, 0.25), inherit_loss="mae")
    return child, parent, config


def global_batches(steps=STEPS, seed=0):
    """The same global batches for every layout: numpy, (GLOBAL_BATCH, IMAGE, IMAGE, 3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        label = rng.integers(0, CLASSES, size=GLOBAL_BATCH).astype(np.int32)
        image = rng.normal(size=(GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
        image[np.arange(GLOBAL_BATCH), :, :, label] += 1.0
        batches.append({"image": image, "label": label})
    return batches


def build(mesh, *, parent_widths=PARENT_WIDTHS, method="hkt", shard_trainable=False, parent_min_elements=None):
    """(state, parent_variables placed, train_step) for the toy HKT pair on ``mesh``, through the same
    factories and step compiler as training."""
    import jax
    import jax.numpy as jnp

    from hkt_jax.training import factories, sharding
    from hkt_jax.training.config import OptimConfig
    from hkt_jax.tasks import Classification

    child, parent, hkt_config = _models(parent_widths)
    task = Classification()
    sample = jnp.zeros((2, IMAGE, IMAGE, 3), jnp.float32)
    parent_variables = parent.init(jax.random.key(1), sample)
    # Non-trivial running statistics, so inference-mode BatchNorm in the parent matters.
    parent_variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.1 * (1 + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) % 3)
            if "batch_stats" in jax.tree_util.keystr(path)
            else x
        ),
        parent_variables,
    )
    loss_fn, init_variables = factories.make_method(
        method, child, task, sample, jax.random.key(2), parent=parent, parent_variables=parent_variables, hkt=hkt_config
    )
    tx, schedule = factories.make_optimization(
        OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="constant"), 1, STEPS
    )
    state = initial_state(init_variables, tx)
    state_sh = sharding.state_shardings(state, mesh, shard_trainable=shard_trainable)
    kwargs = {} if parent_min_elements is None else {"min_elements": parent_min_elements}
    placed_state = sharding.put(state, state_sh)
    placed_parent = sharding.put(parent_variables, sharding.parent_shardings(parent_variables, mesh, **kwargs))
    train_step, _ = compile_steps(
        task=task,
        model=child,
        loss_fn=loss_fn,
        tx=tx,
        schedule=schedule,
        parent_variables=parent_variables,
        mesh=mesh,
        state=placed_state,
        shard_trainable=shard_trainable,
        parent_min_elements=parent_min_elements,
    )
    return placed_state, placed_parent, train_step


def local_rows(batch):
    """This process's contiguous slice of a global batch."""
    import jax

    per = GLOBAL_BATCH // jax.process_count()
    start = jax.process_index() * per
    return {k: v[start : start + per] for k, v in batch.items()}


def host_value(x):
    """A (possibly multi-process) global array as numpy."""
    import numpy as np
    from jax.experimental import multihost_utils

    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hkt_steps(mesh, steps=STEPS, **build_kwargs):
    """Losses per step and the final trainable params (flat numpy dict) for the toy pair."""
    import jax

    from hkt_jax.training import sharding

    state, parent_variables, train_step = build(mesh, **build_kwargs)
    losses, metrics_rows = [], []
    for batch in global_batches(steps):
        state, metrics = train_step(state, parent_variables, sharding.global_batch(local_rows(batch), mesh))
        losses.append(float(host_value(metrics["loss"])))
        metrics_rows.append({k: float(host_value(v)) for k, v in metrics.items()})
    flat = {
        jax.tree_util.keystr(path): host_value(leaf).tolist()
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    stats = {
        jax.tree_util.keystr(path): host_value(leaf).tolist()
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.batch_stats)
    }
    return {
        "losses": losses,
        "params": flat,
        "batch_stats": stats,
        "metrics": metrics_rows,
        "parent_specs": {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_leaves_with_path(parent_variables)
        },
        "state": state,
        "parent_variables": parent_variables,
        "train_step": train_step,
    }


def _plain(result):
    return {k: v for k, v in result.items() if k not in ("state", "parent_variables", "train_step")}


# -- tasks --------------------------------------------------------------------------------------------


def task_steps(args):
    from hkt_jax.training import sharding

    mesh = sharding.make_mesh(-1, args.model)
    out = hkt_steps(mesh)
    result = _plain(out)
    if args.workdir:  # orbax: every process writes its part, then restores it onto the same shardings
        result["checkpoint"] = _checkpoint_roundtrip(out, mesh, args.workdir)
    return result


def _checkpoint_roundtrip(out, mesh, workdir):
    import jax
    import numpy as np

    from hkt_jax.training import checkpoint, sharding

    state, train_step, parent_variables = out["state"], out["train_step"], out["parent_variables"]
    manager = checkpoint.training_manager(workdir)
    checkpoint.save_training(manager, int(host_value(state.step)), state, {"position": 5})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    latest = checkpoint.restore_latest_readable(manager, abstract)
    restored, data_state = latest.state, latest.data
    manager.close()
    same = all(
        np.array_equal(host_value(a), host_value(b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored))
    )
    same_sharding = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    restored_step = int(host_value(restored.step))
    # One more step from the restored state must equal one more step from the live one (both donated).
    batch = sharding.global_batch(local_rows(global_batches(STEPS + 1)[-1]), mesh)
    _, m_restored = train_step(restored, parent_variables, batch)
    _, m_live = train_step(state, parent_variables, batch)
    return {
        "equal": bool(same),
        "same_sharding": bool(same_sharding),
        "data_state": data_state,
        "next_loss_restored": float(host_value(m_restored["loss"])),
        "next_loss_live": float(host_value(m_live["loss"])),
        "step": restored_step,
    }


def task_allreduce(args):
    """All-reduce bytes of the compiled HKT step (two parent sizes) and of the plain child step."""
    from hkt_jax.training import sharding
    from hkt_jax.models import parameter_count

    mesh = sharding.make_mesh(-1, 1)
    result = {}
    for name, kwargs in {
        "hkt": {},
        "hkt_big_parent": {"parent_widths": (32, 64)},
        "child": {"method": "child"},
    }.items():
        state, parent_variables, train_step = build(mesh, **kwargs)
        batch = sharding.global_batch(global_batches(1)[0], mesh)
        text = train_step.lower(state, parent_variables, batch).compile().as_text()
        ops = sharding.collective_ops(text)
        child_params = state.params["child"]
        later_stages = {k: v for k, v in child_params.items() if not k.startswith("stem")}
        result[name] = {
            "allreduce_bytes": sharding.allreduce_bytes(text),
            "collective_kinds": sorted({kind for kind, _ in ops}),
            "trainable_bytes": sharding.tree_bytes(state.params),
            "child_later_stage_bytes": sharding.tree_bytes(later_stages),
            "adapter_bytes": sharding.tree_bytes(state.params.get("adapters", {})),
            "bn_channels": parameter_count(state.batch_stats) // 2,
            "parent_bytes": sharding.tree_bytes(parent_variables),
        }
    return result


def task_model_axis(args):
    """model=2: the parent's leaves are sharded and the losses equal the replicated run's."""
    from hkt_jax.training import sharding

    sharded = _plain(hkt_steps(sharding.make_mesh(-1, 2), steps=3))
    replicated = _plain(hkt_steps(sharding.make_mesh(-1, 1), steps=3))
    zero = _plain(hkt_steps(sharding.make_mesh(-1, 1), steps=3, shard_trainable=True))
    return {"sharded": sharded, "replicated": replicated, "shard_trainable": zero}


def task_errors(args):
    """Clear errors: a global batch the mesh cannot split; a mesh larger than the devices."""
    import numpy as np

    from hkt_jax.training import sharding

    messages = {}
    mesh = sharding.make_mesh(-1, 1)
    for name, fn in {
        "check_global_batch": lambda: sharding.check_global_batch(12, mesh),
        "global_batch": lambda: sharding.global_batch({"image": np.zeros((12, 2), np.float32)}, mesh),
        "mesh_too_large": lambda: sharding.make_mesh(16, 1),
        "model_not_dividing": lambda: sharding.make_mesh(-1, 3),
    }.items():
        try:
            fn()
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages


TASKS = {"steps": task_steps, "allreduce": task_allreduce, "model_axis": task_model_axis, "errors": task_errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices in this process")
    parser.add_argument("--task", default="steps", help=f"comma-separated: {', '.join(TASKS)} or all")
    parser.add_argument("--model", type=int, default=1, help="mesh.model for --task steps")
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="orbax round trip in this directory (task steps)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from hkt_jax.training import sharding

    if args.coordinator:
        sharding.initialize_distributed(
            args.coordinator, args.num_processes, args.process_id, initialization_timeout=60
        )
    tasks = list(TASKS) if args.task == "all" else args.task.split(",")
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    try:
        for task in tasks:
            result[task] = TASKS[task](args)
    except Exception:  # report it in the file, so the test shows the worker's traceback
        result["error"] = traceback.format_exc()
    out = args.out if jax.process_count() == 1 else f"{args.out}.{jax.process_index()}"
    with open(out, "w") as f:
        json.dump(result, f)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
