r"""Data parallelism and multi-host runs on JAX's own machinery: ``jax.distributed``, meshes and ``NamedSharding``.

One code path from a laptop CPU to a pod: a :class:`~jaxgen.training.Trainer` built with ``mesh=data_mesh()`` keeps
its parameters, optimizer state and EMA replicated on every device of the mesh and shards each batch over the mesh's
``"data"`` axis; the fused training step stays one jitted program, in which XLA inserts the gradient all-reduce. With
one device the mesh is trivial and the program is the single-device one.

Randomness does not depend on the mesh: the batch and the loss's noise are drawn from the same keys as on one device
(JAX's partitionable Threefry draws the same numbers however the result is sharded), so the same seed and global
batch give the same loss curve on 1 and on 8 devices, up to the order of floating-point reductions.

Multi-host: :func:`initialize` starts ``jax.distributed`` when the process was launched as one of several (from the
environment; a no-op otherwise); every process then runs the same program on the global mesh, each feeding its own
part of the batch when the data comes from the host (:func:`global_batch`), and only process 0 writes logs, plots and
reports (:func:`is_main_process`).

Parameter sharding (FSDP style) for models whose training state does not fit one device: annotate parameters with
the mesh axis to split them over, through Flax NNX's partitioning metadata (``nnx.Param(..., out_sharding=(None,
"data"))``, ``nnx.with_partitioning``, :func:`jaxgen.models.shard_parameters`, or ``UNetField(shard_axis="data")``).
The trainer then keeps each annotated parameter, its optimizer moments and its EMA split over that axis
(:func:`parameter_shardings`); each step gathers the weights whole for its forward and backward passes and XLA
reduce-scatters their gradients onto the split state (what is saved is the optimizer state, the EMA and the master
copy, ZeRO-2 style; the weights are whole during a step). Dimensions that the axis does not divide stay whole. The
losses are those of the replicated run.

Migrating from ``pmap``: drop the leading device axis and ``jax.lax.pmean``; build the trainer with
``mesh=data_mesh()`` and give it the *global* batch (``batch_size`` = per-device size x device count). What ``pmap``
did by hand (replicate the state, split the batch, average the gradients) is the mesh's sharding here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Mesh = jax.sharding.Mesh
DATA_AXIS = "data"

_ENV_COORDINATOR = ("JAXGEN_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_ENV_NUM_PROCESSES = ("JAXGEN_NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_PROCESS_ID = ("JAXGEN_PROCESS_ID", "JAX_PROCESS_ID")


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _cluster_launched() -> bool:
    """Whether a cluster manager that ``jax.distributed.initialize()`` detects by itself launched several processes
    (SLURM with more than one task, Open MPI, a multi-host Cloud TPU slice)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize() -> bool:
    """Start ``jax.distributed`` when this process is one of several; returns whether it did.

    Explicit launch (any cluster, or several processes on one machine): set ``JAXGEN_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAXGEN_NUM_PROCESSES`` and ``JAXGEN_PROCESS_ID`` (or the same names with
    ``JAX_``). Under SLURM, Open MPI or on a multi-host Cloud TPU slice, ``jax.distributed.initialize()`` finds its
    settings itself. ``JAXGEN_DISTRIBUTED=0`` turns it off. On CPU the processes talk through Gloo collectives.

    Call it first, before anything touches a device (the ``jaxgen`` command does)."""
    if os.environ.get("JAXGEN_DISTRIBUTED", "1") == "0" or _is_initialized():
        return False
    coordinator, num, pid = _env(_ENV_COORDINATOR), _env(_ENV_NUM_PROCESSES), _env(_ENV_PROCESS_ID)
    if coordinator is None and not _cluster_launched():
        return False
    if coordinator is not None and (num is None or pid is None):
        raise ValueError(f"{_ENV_COORDINATOR[0]}={coordinator} is set, so this is one process of several: also set "
                         f"{_ENV_NUM_PROCESSES[0]} (how many) and {_ENV_PROCESS_ID[0]} (this one's index, from 0).")
    if coordinator is not None and (int(num) < 1 or not 0 <= int(pid) < int(num)):
        raise ValueError(f"need {_ENV_NUM_PROCESSES[0]} >= 1 and 0 <= {_ENV_PROCESS_ID[0]} < "
                         f"{_ENV_NUM_PROCESSES[0]}, got {num} and {pid}.")
    if coordinator is not None and int(num) == 1:
        return False
    # CPU processes need a collectives implementation to talk to each other (GPU/TPU have their own)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num), process_id=int(pid))
    return True


def _is_initialized() -> bool:
    checker = getattr(jax.distributed, "is_initialized", None)
    return bool(checker()) if checker is not None else False


def is_main_process() -> bool:
    """Whether this process writes logs, progress bars, plots and reports (process 0)."""
    return jax.process_index() == 0


def data_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh ``("data",)`` over ``devices`` (default: every device of every process), with automatic
    axes, so unannotated code partitions without changes."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.sharding.Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The sharding of a batch: the leading axis split over the mesh's ``"data"`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS, *([None] * (ndim - 1))))


def data_size(mesh: Mesh | None) -> int:
    """The number of devices the batch is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def check_mesh(mesh: Any) -> None:
    """Raise for a mesh without a ``"data"`` axis."""
    if not isinstance(mesh, jax.sharding.Mesh) or DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with a {DATA_AXIS!r} axis (jaxgen.training.data_mesh()), "
                         f"got {mesh!r}.")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Inside a jitted function: constrain every array of ``batch`` to be split over the data axis along its leading
    (batch) axis; scalars stay replicated. Raises ``ValueError`` for a batch that does not split evenly."""
    def place(x):
        if not hasattr(x, "shape"):
            return x
        if x.ndim == 0:
            return jax.lax.with_sharding_constraint(x, replicated(mesh))
        check_batch_divisible(x.shape[0], data_size(mesh), name="the batch's leading size")
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(place, batch)


def check_batch_divisible(batch_size: int, devices: int, *, name: str = "batch_size") -> None:
    """Raise ``ValueError`` when a global batch cannot be split evenly over ``devices`` (the data axis)."""
    n = int(devices)
    if batch_size % n:
        raise ValueError(f"{name}={batch_size} cannot be split over the {n} devices of the data axis; use a multiple "
                         f"of {n} (e.g. {max(n, batch_size - batch_size % n)}).")


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """The global batch from each process's own part (``jax.make_array_from_process_local_data``): the leading axis of
    every array is this process's share, and the result is sharded over the mesh's ``"data"`` axis."""
    def make(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(make, local_batch)


def global_from_local_copy(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global array with ``sharding`` of which every process holds the full value ``x``: each process gives its
    own devices their parts (``jax.make_array_from_callback``)."""
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    host = np.asarray(jax.random.key_data(x) if is_key else x)
    out = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if is_key else out


def parameter_shardings(params: Any, mesh: Mesh) -> Any:
    """The ``NamedSharding`` of every parameter of an ``nnx.State`` on ``mesh``, from its NNX partitioning metadata
    (``out_sharding``): the annotated dimensions split over their mesh axes, except those the axis size does not divide
    (kept whole), unannotated parameters replicated. None when nothing is split (the plain data-parallel case).
    Raises ValueError for an annotation naming an axis the mesh does not have."""
    from flax import nnx

    specs = nnx.get_partition_spec(params)
    split = False

    def place(spec, x):
        nonlocal split
        entries = list(spec) if isinstance(spec, P) else []
        shape = np.shape(x)
        out = []
        for dim, entry in enumerate(entries[: len(shape)]):
            names = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
            missing = [n for n in names if n not in mesh.shape]
            if missing:
                raise ValueError(f"a parameter of shape {shape} is annotated to be split over the mesh axis "
                                 f"{missing[0]!r}, but the mesh has axes {tuple(mesh.shape)}: build the mesh with that "
                                 "axis or annotate with one it has.")
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            keep = bool(names) and size > 1 and shape[dim] % size == 0
            split |= keep
            out.append(entry if keep else None)
        return NamedSharding(mesh, P(*out))

    shardings = jax.tree.map(place, specs, params, is_leaf=lambda v: isinstance(v, P))
    return shardings if split else None


__all__ = ["initialize", "is_main_process", "data_mesh", "replicated", "batch_sharding", "data_size", "shard_batch",
           "parameter_shardings", "global_from_local_copy", "check_batch_divisible", "global_batch", "check_mesh",
           "DATA_AXIS"]
