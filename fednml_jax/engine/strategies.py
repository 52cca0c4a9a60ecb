"""Client-parallel strategies: how one round's client updates are laid out on the hardware.

- `vmap`: every client in one program on one device (client axis vmapped). XLA turns vmapped
  per-client convolutions into grouped convolutions, whose gradients are slow on CPU and on GPU.
- `shard`: one program with the client axis split over a `jax.sharding` mesh of all local devices
  (clients are padded to a multiple of the device count; padding clients weigh 0); each device
  trains its own clients one after another (`shard_map` + `lax.map`), then the aggregation runs
  over the whole, sharded client axis.
- `loop`: a Python loop over clients calling one jitted single-client program (compiled once).

All three compute the same function: tests check that they agree. With `batched_runs=True` every
input but the images carries a leading run axis (several runs of the same program, one per row) and
the round is vmapped over it (`loop` loops over the runs); with `shard_runs=True` as well (`shard`
only) the run axis is split over the mesh instead, each device training its runs, and each run's
clients, one after another (`RunBatch` does this when the runs are a multiple of the devices).
`auto` picks `loop` on CPU and on a single accelerator, `shard` when there are several
accelerators: XLA turns vmapped per-client convolutions into grouped convolutions, whose gradients
are slow on CPU and on GPU alike (a ResNet-18 FedAvg round at the paper's configuration on one
H100: `vmap` 9.3 s, `loop` 1.07 s; see docs/performance.md). On CPU the clients (or runs) a
device trains in turn are unrolled rather than looped (`map_in_turn`).
A multi-host run (`fednml_jax.distributed`) always uses `shard`, over the devices of every host.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fednml_jax import distributed
from fednml_jax.engine.compile_ahead import AheadOfTime
from fednml_jax.errors import ConfigError


def resolve_strategy(name: str) -> str:
  if distributed.multi_process():
    if name not in ("auto", "shard"):
      raise ConfigError(f"config.fl.strategy = {name!r} runs on one device, but this is a "
                        f"{jax.process_count()}-process run: use 'shard' (or 'auto').")
    return "shard"
  if name != "auto":
    return name
  if jax.default_backend() == "cpu" or jax.device_count() == 1:
    return "loop"
  return "shard"


def client_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("clients",))


def stack_trees(trees):
  """Pytrees of one structure stacked leaf by leaf on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def client_keys(round_key, num_clients: int):
  return jax.vmap(lambda k: jax.random.fold_in(round_key, k))(jnp.arange(num_clients))


class RoundProgram:
  """Runs all clients' local training for one round and aggregates, for one method phase.

  `__call__(global_vars, images, clients, scalars, round_key) -> (new_global_vars, client_losses,
  client_vars, client_outputs)`; `client_vars` are the stacked local models and `client_outputs`
  the stacked `local_output`s of the method (both with a leading client axis). With
  `batched_runs=True`, every argument but `images` and every output has a leading run axis.
  """

  def __init__(self, strategy: str, client_update, aggregate, batched_runs: bool = False,
               per_client_images: bool = False, shard_runs: bool = False):
    self.strategy, self.batched_runs = strategy, batched_runs
    self.per_client_images = per_client_images  # `images` has a leading client axis
    # `shard_runs`: batched runs split over the devices, each device training its runs in turn.
    if shard_runs and (strategy != "shard" or not batched_runs or per_client_images):
      raise ValueError("shard_runs needs the shard strategy, batched runs and shared images")
    self.traces = 0  # how many times a program was traced: must stay constant across rounds

    def counted(fn):
      def wrapper(*args):
        self.traces += 1
        return fn(*args)
      return wrapper

    def train_all(global_vars, images, clients, scalars, round_key):
      keys = client_keys(round_key, clients["count"].shape[0])
      if strategy == "shard":
        return train_each_device(global_vars, images, clients, scalars, keys)
      image_axis = 0 if per_client_images else None
      return jax.vmap(client_update, in_axes=(None, image_axis, 0, None, 0))(
          global_vars, images, clients, scalars, keys)

    def train_in_turn(global_vars, images, clients, scalars, keys):
      # Clients one after another (`lax.map`), never vmapped: vmapped clients would be grouped
      # convolutions, as slow on GPU as under `vmap`.
      def one(args):
        client, key, client_images = args
        return client_update(global_vars, client_images if per_client_images else images,
                             client, scalars, key)

      xs = (clients, keys, images if per_client_images else None)
      return map_in_turn(one, xs, keys.shape[0])

    def train_each_device(global_vars, images, clients, scalars, keys):
      # Each device trains its block of clients in turn.
      clients_spec = PartitionSpec("clients")
      image_spec = clients_spec if per_client_images else PartitionSpec()
      # check_vma off: the local scan carries values that start replicated (the global model).
      specs = (PartitionSpec(), image_spec, clients_spec, PartitionSpec(), clients_spec)
      return jax.shard_map(train_in_turn, mesh=client_mesh(), in_specs=specs,
                           out_specs=clients_spec, check_vma=False)(
                               global_vars, images, clients, scalars, keys)

    def runs_each_device(global_vars, images, clients, scalars, round_keys):
      # Batched runs split over the devices (`shard_runs`): each device trains its runs in turn,
      # and each run's clients in turn, with the whole client axis on the device.
      def block(global_vars, images, clients, scalars, round_keys):
        def one_run(args):
          run_vars, run_clients, run_scalars, round_key = args
          keys = client_keys(round_key, run_clients["count"].shape[0])
          client_vars, losses, outputs = train_in_turn(run_vars, images, run_clients,
                                                       run_scalars, keys)
          return aggregate(client_vars, run_clients, run_vars), losses, client_vars, outputs

        return map_in_turn(one_run, (global_vars, clients, scalars, round_keys),
                           round_keys.shape[0])

      runs_spec = PartitionSpec("clients")  # the one mesh axis, here over runs
      specs = (runs_spec, PartitionSpec(), runs_spec, runs_spec, runs_spec)
      return jax.shard_map(block, mesh=client_mesh(), in_specs=specs, out_specs=runs_spec,
                           check_vma=False)(global_vars, images, clients, scalars, round_keys)

    def train_and_aggregate(global_vars, images, clients, scalars, round_key):
      client_vars, losses, outputs = train_all(global_vars, images, clients, scalars, round_key)
      return aggregate(client_vars, clients, global_vars), losses, client_vars, outputs

    self.train_and_aggregate = train_and_aggregate  # one run's round, unjitted
    if shard_runs:
      self._round = AheadOfTime(counted(runs_each_device), out_shardings=runs_sharding())
      return
    if batched_runs:
      train_and_aggregate = jax.vmap(train_and_aggregate, in_axes=(0, None, 0, 0, 0))
    if strategy == "shard":
      # The new global model on every device, the per-client outputs split like the clients.
      mesh = client_mesh()
      by_client = NamedSharding(mesh, PartitionSpec(*([None] * batched_runs), "clients"))
      self._round = AheadOfTime(counted(train_and_aggregate), out_shardings=(
          NamedSharding(mesh, PartitionSpec()), by_client, by_client, by_client))
    elif strategy == "vmap":
      self._round = AheadOfTime(counted(train_and_aggregate))
    elif strategy == "loop":
      self._client = AheadOfTime(counted(client_update))
      self._aggregate = jax.jit(counted(aggregate))
    else:
      raise ValueError(f"unknown strategy {strategy!r}")

  def __call__(self, global_vars, images, clients, scalars, round_key):
    if self.strategy in ("vmap", "shard"):
      return self._round(global_vars, images, clients, scalars, round_key)
    if self.batched_runs:
      row = lambda tree, r: jax.tree.map(lambda a: a[r], tree)  # noqa: E731
      runs = [self._loop_round(row(global_vars, r), images, row(clients, r), row(scalars, r),
                               round_key[r]) for r in range(len(round_key))]
      return stack_trees(runs)
    return self._loop_round(global_vars, images, clients, scalars, round_key)

  def fingerprint(self, global_vars, images, clients, scalars, round_key) -> str:
    """A hash of one run's round program as lowered for these (unbatched) arguments, constants
    included: two runs with equal fingerprints compute the same function of their inputs."""
    lowered = jax.jit(self.train_and_aggregate).lower(global_vars, images, clients, scalars,
                                                      round_key)
    return hashlib.sha256(lowered.as_text().encode()).hexdigest()

  def compile_in(self, executor, global_vars, images, clients, scalars, round_key):
    """Starts compiling the program of a round with these (one run's) arguments in `executor`
    (`compile_ahead.AheadOfTime`); the round then runs it without compiling."""
    if self.batched_runs:
      raise ValueError("compile_in takes one run's arguments")
    if self.strategy == "loop":  # every client's call has the signature of the first's
      keys = client_keys(round_key, int(clients["count"].shape[0]))
      return self._client.compile_in(executor, *self._client_args(
          global_vars, images, clients, scalars, keys, 0))
    return self._round.compile_in(executor, global_vars, images, clients, scalars, round_key)

  def _client_args(self, global_vars, images, clients, scalars, keys, k):
    return (global_vars, images[k] if self.per_client_images else images,
            jax.tree.map(lambda a: a[k], clients), scalars, keys[k])

  def _loop_round(self, global_vars, images, clients, scalars, round_key):
    num_clients = int(clients["count"].shape[0])
    keys = client_keys(round_key, num_clients)
    outputs = [self._client(*self._client_args(global_vars, images, clients, scalars, keys, k))
               for k in range(num_clients)]
    client_vars, losses, client_outputs = (stack_trees([o[i] for o in outputs]) for i in range(3))
    return self._aggregate(client_vars, clients, global_vars), losses, client_vars, client_outputs


MAX_UNROLLED_ON_CPU = 16  # more items than this per device keep the loop (compile time)


def map_in_turn(fn, xs, length: int):
  """`lax.map(fn, xs)` over the leading axis of `xs` (of `length`): a loop on accelerators,
  unrolled on CPU up to `MAX_UNROLLED_ON_CPU` items. XLA:CPU runs the convolution gradients inside
  a loop in layouts it has no fast kernel for (as for a rolled local-step scan, see
  local_training): a FedAvg round of the CPU preset under `shard` on 2 virtual CPU devices took
  15.4 s with the clients in a loop, 0.7–1.0 s unrolled, against 0.93–0.97 s under `loop`. The
  price is compile time, about linear in the unrolled items (batched runs of that preset: 25 s
  for 4 client updates per device, 53 s for 8)."""
  if length > 1 and (jax.default_backend() != "cpu" or length > MAX_UNROLLED_ON_CPU):
    return jax.lax.map(fn, xs)
  outputs = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(length)]
  return jax.tree.map(lambda *parts: jnp.stack(parts), *outputs)


def runs_sharding() -> NamedSharding:
  """A leading run axis split over the devices (`RoundProgram(shard_runs=True)`)."""
  return NamedSharding(client_mesh(), PartitionSpec("clients"))


def place_runs(tree):
  """Arrays with a leading run axis, split over the devices."""
  return jax.device_put(tree, runs_sharding())


def place_clients(strategy: str, clients):
  """Puts stacked client arrays on the device(s): split over the mesh for `shard` (each process
  materialises its own clients' rows)."""
  if strategy == "shard":
    return distributed.put_sharded(clients, client_mesh(), "clients")
  return jax.device_put(clients)


def place_client_images(strategy: str, images, sample_index):
  """Each client's training images as a block (K, n_max, H, W, C), `images[sample_index]`: split
  over the mesh for `shard`, where each process gathers only its own clients' blocks."""
  shape = np.shape(sample_index) + np.shape(images)[1:]
  if strategy == "shard":
    return distributed.put_sharded_rows(shape, client_mesh(), "clients",
                                        lambda rows: np.asarray(images)[sample_index[rows]])
  return jax.device_put(np.asarray(images)[sample_index])


def process_client_rows(strategy: str, num_clients: int) -> np.ndarray:
  """The clients (rows of the client axis) whose blocks this process places: under `shard`,
  those of its devices in the mesh; otherwise all of them."""
  if strategy != "shard":
    return np.arange(num_clients)
  return distributed.addressable_rows(num_clients, client_mesh(), "clients")


def place_replicated(strategy: str, tree):
  """Puts arrays every client reads (images, the global model) on the device(s): on every device
  of the mesh for `shard`."""
  if strategy == "shard":
    return distributed.put_replicated(tree, client_mesh())
  return jax.device_put(tree)


def client_padding(strategy: str) -> int:
  """Clients are padded to a multiple of this number."""
  return jax.device_count() if strategy == "shard" else 1
