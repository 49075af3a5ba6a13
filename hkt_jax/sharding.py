"""Device mesh and shardings: one program from one CPU to a pod slice.

The mesh has a ``data`` axis (the global batch is split along it) and a
``model`` axis (size 1 unless the frozen parent is too large to replicate).
Trainable state is replicated; ``jax.jit`` with these shardings inserts the
gradient all-reduce, and BatchNorm statistics are taken over the global batch
because the model code reduces over the (global) batch axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all). ``data=-1`` takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ValueError(f"mesh.model must be >= 1, got {model}")
    if data == -1:
        if len(devices) % model:
            raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices present")
        data = len(devices) // model
    if data < 1:
        raise ValueError(f"mesh.data must be >= 1 or -1, got {data}")
    if data * model > len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices, but only {len(devices)} are "
            f"present ({jax.default_backend()}); on CPU simulate more with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    grid = np.asarray(devices[: data * model]).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    shards = mesh.shape[DATA_AXIS]
    if global_batch_size % shards:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {shards} data shards of the mesh; "
            f"pick a multiple of {shards}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {jax.process_count()} processes"
        )


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the batch -> a global array sharded along ``data``."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
