"""Device mesh, shardings and multi-host start-up: one program from a CPU to a pod slice.

The mesh has two axes:

* ``data``  - data parallelism: the global batch is split over it, trainable
  state is replicated over it, and ``jax.jit`` inserts the gradient all-reduce.
* ``model`` - size 1 unless the frozen parent is too large to replicate. Then
  every parent parameter is sharded over it along its largest divisible
  dimension (FSDP-style: stored sharded, all-gathered inside the step), and
  the batch is split over ``data x model`` so no device computes twice.

Global-batch semantics: the loss is a mean over the *global* batch and
BatchNorm reduces over the global batch axis, so under GSPMD the same global
batch gives the same loss, statistics and update on 1 or N devices.

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize``
(auto-detected cluster, or an explicit coordinator); afterwards every process
builds only its contiguous slice of each global batch and ``global_batch``
assembles the global array. No ``pmap`` anywhere.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)  # the batch is split over every device of the mesh
# Parent leaves smaller than this stay replicated under FSDP (BatchNorm vectors, biases):
# sharding them saves nothing and costs a collective each.
FSDP_MIN_ELEMENTS = 1024


# -- multi-host start-up -----------------------------------------------------------------------------


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Start JAX's multi-process runtime; returns whether it was started.

    * explicit: ``coordinator_address="host:port"``, ``num_processes``, ``process_id``
      (a manual launch: the same command on every host, differing in process_id);
    * ``auto=True``: ``jax.distributed.initialize()`` detects the cluster (TPU pod
      slices, SLURM, Open MPI, Kubernetes ...);
    * neither: single process, nothing to do.

    Must run before anything touches the devices. On CPU the cross-process
    collectives go through gloo.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "a manual multi-host launch needs all of --coordinator_address, --num_processes and "
                f"--process_id, got coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes!r}, process_id={process_id!r}"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    elif not auto:
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )
    return True


# -- mesh -------------------------------------------------------------------------------------------


def _ordered_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    """All devices, each process's devices contiguous and in process order: the
    batch slice a process loads then lands on that process's own devices."""
    devices = list(jax.devices() if devices is None else devices)
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: all). ``data=-1`` takes what is left."""
    devices = _ordered_devices(devices)
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
            f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model} (set before jax is imported)"
        )
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} uses {data * model} of the {len(devices)} devices of "
            f"{jax.process_count()} processes; a multi-process mesh must use every device (mesh.data=-1)"
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# -- shardings --------------------------------------------------------------------------------------


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device: ``data x model``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(
    shape: Sequence[int],
    axis_size: int,
    axes: str | tuple[str, ...] = MODEL_AXIS,
    min_elements: int = FSDP_MIN_ELEMENTS,
) -> P:
    """Shard the largest dimension divisible by ``axis_size`` over ``axes``; P() if none is
    (or the leaf is smaller than ``min_elements``)."""
    if axis_size <= 1 or math.prod(shape) < min_elements:
        return P()
    candidates = [(size, -i) for i, size in enumerate(shape) if size % axis_size == 0]
    if not candidates:
        return P()
    _, neg_dim = max(candidates)
    spec: list[Any] = [None] * len(shape)
    spec[-neg_dim] = axes
    return P(*spec)


def parent_shardings(parent_variables: Any, mesh: Mesh, *, min_elements: int = FSDP_MIN_ELEMENTS) -> Any:
    """Per-leaf shardings of the frozen parent: FSDP over ``model`` when it is > 1, else replicated."""
    size = mesh.shape[MODEL_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size, MODEL_AXIS, min_elements)), parent_variables
    )


def state_shardings(state: Any, mesh: Mesh, *, shard_trainable: bool = False) -> Any:
    """Per-leaf shardings of the train state (a pytree, e.g. ``TrainState``).

    Default: everything replicated (the child is small; the gradient is then one
    all-reduce). ``shard_trainable=True``: params and optimizer state sharded
    ZeRO/FSDP-style over every device along their largest divisible dimension
    (XLA then reduce-scatters gradients and all-gathers params).
    """
    repl = replicated(mesh)
    if not shard_trainable:
        return jax.tree.map(lambda _: repl, state)
    size = num_batch_shards(mesh)

    def leaf(x):
        return NamedSharding(mesh, fsdp_spec(np.shape(x), size, BATCH_AXES))

    sharded = {"params", "opt_state"}
    fields = getattr(state, "__dataclass_fields__", None)
    if fields is None:
        return jax.tree.map(leaf, state)
    return state.replace(
        **{name: jax.tree.map(leaf if name in sharded else (lambda _: repl), getattr(state, name)) for name in fields}
    )


def gather_inside(loss_fn: Callable, mesh: Mesh) -> Callable:
    """``loss_fn(params, batch_stats, parent_variables, batch)`` with the parent's
    variables all-gathered (replicated) at use: FSDP for the frozen parent. A no-op
    when the ``model`` axis has size 1."""
    if mesh.shape[MODEL_AXIS] == 1:
        return loss_fn
    repl = replicated(mesh)

    def gathered(params, batch_stats, parent_variables, batch):
        parent_variables = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, repl), parent_variables)
        return loss_fn(params, batch_stats, parent_variables, batch)

    return gathered


def put(tree: Any, shardings: Any) -> Any:
    """Place host values (the same on every process) as global arrays with ``shardings``
    (a matching pytree, or one sharding for all). Works across processes."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return put(tree, replicated(mesh))


# -- batches ----------------------------------------------------------------------------------------


def check_global_batch(global_batch_size: int, mesh: Mesh) -> None:
    shards = num_batch_shards(mesh)
    if global_batch_size <= 0 or global_batch_size % shards:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {shards} batch shards of the mesh "
            f"(data={mesh.shape[DATA_AXIS]} x model={mesh.shape[MODEL_AXIS]}); pick a multiple of {shards}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {jax.process_count()} processes"
        )


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the batch -> a global array sharded along the batch axes.

    Process ``p`` of ``P`` must hold rows ``[p*G/P, (p+1)*G/P)`` of the global batch
    (what ``hkt_jax.data.make_datasets`` builds); single process: the whole batch.
    """
    sharding = batch_sharding(mesh)

    def make(x):
        x = np.asarray(x)
        if (x.shape[0] * jax.process_count()) % num_batch_shards(mesh):
            raise ValueError(
                f"a global batch of {x.shape[0] * jax.process_count()} ({x.shape[0]} per process) cannot be "
                f"split over the {num_batch_shards(mesh)} batch shards of the mesh"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(make, local_batch)


class DevicePrefetch:
    """Global batches put on the devices ``size - 1`` steps ahead of the step that takes them.

    Each ``next`` first reads and places the batch ``size - 1`` steps further (host work and the
    host-to-device copy overlap the steps still running on the device), then hands out the oldest one.
    ``position()`` is the source's state after the last batch handed out, not after the prefetched
    ones: what a checkpoint of the step that consumed it must record to resume on the next batch.
    (``flax.jax_utils.prefetch_to_device`` is the pmap-era version of this.)
    """

    def __init__(self, local_batches: Any, mesh: Mesh, size: int = 2):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._source, self._mesh, self._size = local_batches, mesh, size
        self._queue: collections.deque = collections.deque()
        self._position = copy.deepcopy(local_batches.get_state())

    def __iter__(self) -> "DevicePrefetch":
        return self

    def __next__(self) -> Any:
        while len(self._queue) < self._size:
            local = next(self._source)
            self._queue.append((global_batch(local, self._mesh), copy.deepcopy(self._source.get_state())))
        batch, self._position = self._queue.popleft()
        return batch

    def position(self) -> Any:
        return self._position


# -- what a compiled step communicates ----------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# "%name = TYPE all-reduce(...)" / "all-reduce-start(...)"; TYPE is an array or a tuple of arrays
# (which may hold "/*index=5*/" comments).
_OP_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _shape_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY_RE.findall(type_text):
        if dtype not in _DTYPE_BYTES:
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_ops(hlo_text: str) -> list[tuple[str, int]]:
    """(op kind, bytes of its result per device) for each collective in an HLO module's text.

    For an all-reduce the result has the operand's shape, so this is the
    operand size; async pairs count once (the ``-start``; ``-done`` is skipped).
    """
    ops = []
    for line in hlo_text.splitlines():
        match = _OP_RE.search(line)
        if match:
            ops.append((match.group(2), _shape_bytes(match.group(1))))
    return ops


def allreduce_bytes(hlo_text: str) -> int:
    """Sum of the operand sizes of every all-reduce in the module (per device, per step)."""
    return sum(size for kind, size in collective_ops(hlo_text) if kind == "all-reduce")


def tree_bytes(tree: Any) -> int:
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def simulated_cpu_env(num_devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` whose XLA_FLAGS make the CPU backend show ``num_devices`` devices
    (for a subprocess: the flag must be set before jax is imported)."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env
