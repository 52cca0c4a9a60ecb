"""Multi-host runs: `jax.distributed.initialize()` and moving arrays between hosts and the global
device mesh.

With `python run.py --distributed ...` started once per host (process), every process builds the
same simulated federation from (config, seed), the client axis is split over the devices of all
hosts (the `shard` strategy over a global `jax.sharding` mesh), and each process materialises only
the rows of the clients whose devices it owns (`put_sharded`). The training images are laid out
per client there (`fl.image_layout=auto`): each device holds only its clients' images, and each
process reads only those (with the training images' statistics summed over processes) where the
data source reads rows on demand (the CSV + image-folder sources; an `.npz` file is read whole).
Host steps (Gaussian-mixture fits) run on every
process on all-gathered arrays, so their results agree; only process 0 writes files.
Single-process runs use the same functions, which reduce to `jax.device_put`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed.initialize` (arguments None: detected from the cluster environment, e.g.
  SLURM, Open MPI or a TPU pod). On CPU, cross-process collectives go through gloo."""
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def multi_process() -> bool:
  return jax.process_count() > 1


def primary_first(fn):
  """`fn()` on process 0, then on the others (e.g. a load that may build a shared cache)."""
  if not multi_process():
    return fn()
  result = fn() if is_primary() else None
  multihost_utils.sync_global_devices("fednml_jax: process 0 went first")
  return result if is_primary() else fn()


def gather_from_processes(array: np.ndarray) -> np.ndarray:
  """Every process's `array` (same shape and dtype everywhere) stacked on a new leading axis, bit
  for bit (sent as bytes, so float64 survives JAX's default 32-bit mode)."""
  array = np.ascontiguousarray(array)
  if not multi_process():
    return array[None]
  raw = np.asarray(multihost_utils.process_allgather(array.reshape(-1).view(np.uint8)))
  return raw.view(array.dtype).reshape((-1,) + array.shape)


def put_sharded(tree, mesh, axis: str):
  """Host arrays (identical on every process) split along their leading axis over `axis` of
  `mesh`; each process materialises only the blocks of its own devices."""
  return jax.tree.map(lambda a: put_sharded_rows(
      np.shape(a), mesh, axis, lambda rows, a=a: np.asarray(a)[rows]), tree)


def put_sharded_rows(shape, mesh, axis: str, rows):
  """A global array of `shape` split along its leading axis over `axis` of `mesh`, built from
  `rows(slice) -> np.ndarray` (those rows, whole in the other axes), called only for the blocks of
  this process's devices."""
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  return jax.make_array_from_callback(tuple(shape), sharding, lambda index: rows(index[0]))


def addressable_rows(num_rows: int, mesh, axis: str) -> np.ndarray:
  """The rows of a leading axis of `num_rows` split over `axis` of `mesh` (as `put_sharded_rows`
  splits it) that live on this process's devices, sorted."""
  blocks = NamedSharding(mesh, PartitionSpec(axis)).addressable_devices_indices_map((num_rows,))
  return np.unique(np.concatenate([np.arange(num_rows)[index[0]] for index in blocks.values()]))


def put_replicated(tree, mesh):
  """Host or device arrays (identical on every process) copied onto every device of `mesh`."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda a: jax.make_array_from_callback(
      np.shape(a), sharding, lambda index, a=a: np.asarray(a)[index]), tree)


def to_host(tree):
  """Numpy copies of (possibly globally sharded) arrays, the same on every process."""
  def fetch(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree.map(fetch, tree)
