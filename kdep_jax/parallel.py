"""One code path from one CPU to a TPU pod: a ('data',) mesh, a sharded batch, replicated state.

Under `jax.jit` over a batch sharded along 'data', every reduction over the batch (the loss mean,
BatchNorm's statistics) is global, so BatchNorm is synchronised across devices and hosts for free.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdep_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, multihost: bool = False) -> None:
    """Joins a multi-process run; must run before anything touches a device.

    No flags: a single process. Explicit flags: processes started by hand (on CPU they talk through
    gloo). `multihost` alone: let JAX detect a TPU pod slice or a Slurm allocation.
    """
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not multihost:
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise UserError("Multi-process runs need all three of --coordinator_address, --num_processes and "
                         "--process_id (or only --multihost to detect a TPU pod or Slurm cluster).")
    # Only the CPU backend reads this; on GPU and TPU the accelerator's own collectives are used.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh over all devices (or the given ones), in process order."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches stacked on a leading axis (one per step of a call), each sharded along 'data'."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch (`validation.validate` has checked that it splits evenly)."""
    return global_batch_size // jax.process_count()


def sync(name: str) -> None:
    """Waits until every process gets here (after process 0 wrote a file the others read next)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's rows into global arrays sharded along 'data'."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def shard_batches(local_batches: list[dict], mesh: Mesh, steps_per_call: int) -> dict:
    """Each process's rows of up to `steps_per_call` batches, stacked on a leading axis into global arrays sharded
    along 'data' (`trainer.make_train_step`). The last batch fills the places of missing ones, which go unused."""
    filled = local_batches + local_batches[-1:] * (steps_per_call - len(local_batches))
    sharding = stacked_batch_sharding(mesh)
    return jax.tree.map(lambda *xs: jax.make_array_from_process_local_data(sharding, np.stack(xs)), *filled)


def map_in_chunks(fn, batch: jax.Array, max_per_device: int):
    """fn(batch) computed one chunk after another, each at most `max_per_device` of every device's rows (all of them
    when 0), its outputs' rows back in the batch's order. Chunk j holds every n-th row from j on, so each chunk is
    sharded over the devices as the batch is and no row crosses devices. fn must treat rows independently. The rows
    are taken to be spread over all of JAX's devices, as `make_mesh()` spreads them; on a smaller mesh the chunks
    differ in size, not in what they compute."""
    size = batch.shape[0]
    per_device = size // jax.device_count() if size % jax.device_count() == 0 else size
    chunks = next(n for n in range(1, per_device + 1)
                  if per_device % n == 0 and (not max_per_device or per_device // n <= max_per_device))
    if chunks == 1:
        return fn(batch)
    strided = batch.reshape(size // chunks, chunks, *batch.shape[1:]).swapaxes(0, 1)
    outputs = jax.lax.map(fn, strided)
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(size, *x.shape[2:]), outputs)


def replicate(tree, mesh: Mesh):
    """Places a host pytree (identical on every process) on every device of the mesh."""
    sharding = replicated_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Fetches a replicated pytree to numpy on every process (no cross-host traffic needed)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                        tree)
