"""The training loop: `train_and_evaluate(config, workdir)`.

One run = data → simulated clients (partition, label noise, missing classes) → rounds of
[method's host step → all clients' local training in one compiled program → aggregation] →
evaluation on validation and test every `eval.every` rounds. Writes, in `workdir`:
- `config.json`: the resolved config;
- `metrics.jsonl`: one JSON object per line: `{"round", "split", "metrics"}` per evaluation, and
  `{"round", "split": "train", ...}` records of client losses and method diagnostics;
- `summary.json`: method, dataset, rounds, seed, seconds, best_val_round, test_final,
  test_at_best_val (each with mAP, F1, Recall, BAcc, Precision, AUROC), and the class-prior baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from fednml_jax import checkpointing, distributed
from fednml_jax import config as config_lib
from fednml_jax.corruption import SINGLE_LABEL_NOISE_TYPES, one_hot_classes, simulate_clients
from fednml_jax.data import load_dataset
from fednml_jax.data.types import RowReader, channel_sums, moments_from_sums
from fednml_jax.engine import inference, local_training, strategies
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError, UserError
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.metrics import HEADLINE
from fednml_jax.models import (build_model, cpu_slow_path_warning, init_variables,
                               load_pretrained)
from fednml_jax.tasks import get_task

# Independent random streams derived from the run seed (numpy streams for the simulation are
# derived inside `simulate_clients` from the same seed).
STREAM_INIT, STREAM_TRAIN, STREAM_REFINE = 0, 1, 2


class JsonlWriter:
  """Appends one JSON object per line and flushes, so a killed run keeps what it logged."""

  def __init__(self, path):
    self.path = path

  def write(self, record: dict):
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value)}")


def prepare_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe file per process: the processes of a multi-host run share the workdir.
    probe = os.path.join(workdir, f".write_test.{platform.node()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as err:
    raise UserError(f"Cannot write to the workdir {workdir!r} ({err.strerror}). Choose a folder "
                    "you can write to with --workdir.") from None


def build_federation(config, dataset, task, client_padding: int) -> FederatedSetup:
  """Simulates the clients: partition, label noise and missing classes (ALGORITHMS.md §1)."""
  num_classes = dataset.num_classes
  annotation_num = config.labels.annotation_num
  if annotation_num is None:
    annotation_num = num_classes
  if not 1 <= annotation_num <= num_classes:
    raise ConfigError(
        f"config.labels.annotation_num = {annotation_num} is outside 1..{num_classes}: "
        f"{dataset.name} has {num_classes} classes after dropping those with fewer than "
        f"{config.data.min_positives} training positives ({', '.join(dataset.class_names)}).")
  num_train = len(dataset.train)
  if config.fl.num_clients > num_train:
    raise ConfigError(f"config.fl.num_clients = {config.fl.num_clients} exceeds the {num_train} "
                      f"training samples of {dataset.name}; every client needs at least one.")
  noise_type = config_lib.noise_type(config)
  if noise_type in SINGLE_LABEL_NOISE_TYPES:  # the metrics need one-hot evaluation labels too
    for name, split in dataset.splits().items():
      one_hot_classes(split.labels, f"{dataset.name} {name} labels")
  sim = simulate_clients(dataset.train.labels, num_clients=config.fl.num_clients,
                         noise_rate=config.labels.noise_rate, annotation_num=annotation_num,
                         partition=config.labels.partition,
                         dirichlet_alpha=config.labels.dirichlet_alpha, seed=config.seed,
                         noise_type=noise_type,
                         noisy_client_fraction=config.labels.noisy_client_fraction,
                         min_client_noise=config.labels.min_client_noise,
                         train_images=dataset.train.images)
  logging.info("%s label noise, client rates %s, realised %s", noise_type,
               np.round(sim.client_noise_rates, 3).tolist(),
               [round(float(sim.corrupted[idx].mean()), 3) if idx.size else 0.0
                for idx in sim.client_indices])
  layout = ClientLayout.from_indices(sim.client_indices, pad_clients_to=client_padding)
  return FederatedSetup(config=config, task=task, layout=layout,
                        observed_labels=sim.observed_labels, noisy_labels=sim.noisy_labels,
                        clean_labels=sim.clean_labels, corrupted=sim.corrupted,
                        annotated=layout.pad_clients(sim.annotated, False))


def channel_stats(total, squares, count):
  """The per-channel mean and std from `channel_sums`' output, as float32 device constants."""
  mean, std = moments_from_sums(total, squares, count)
  return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def resolve_image_layout(name: str) -> str:
  """`fl.image_layout`: `auto` is `per_client` in a multi-host run, else `shared`."""
  if name == "auto":
    return "per_client" if distributed.multi_process() else "shared"
  return name


def _device_clients(method, state, layout, image_index):
  per_sample, per_client = method.client_arrays(state)
  per_sample = dict(per_sample, sample_index=layout.sample_index, image_index=image_index,
                    valid=layout.valid)
  return {"per_sample": per_sample, "per_client": per_client, "count": layout.counts}


def _select_best(history, select_on, metric="mAP"):
  """The round whose `select_on` `metric` (the task's headline metric) is highest (earliest on
  ties)."""
  best_round, best_value = None, -math.inf
  for rnd, split_metrics in sorted(history.items()):
    value = split_metrics[select_on][metric]
    if value is not None and value > best_value:
      best_round, best_value = rnd, value
  return best_round


def format_table(rows: list[tuple[str, dict]]) -> str:
  """A fixed-width table of the headline metrics, one row per (label, metrics)."""
  header = f"{'':34s}" + "".join(f"{m:>10s}" for m in HEADLINE)
  lines = [header, "-" * len(header)]
  for label, values in rows:
    cells = "".join(f"{values[m]:10.4f}" if values.get(m) is not None else f"{'n/a':>10s}"
                    for m in HEADLINE)
    lines.append(f"{label:34s}{cells}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RoundInputs:
  """What `Experiment.prepare_round` hands to the round program, and `finish_round` back."""

  round: int
  phase: str
  method_state: Any
  clients: Any
  scalars: dict
  round_key: Any
  records: list


class Experiment:
  """One run's fixed parts (data, clients, model, method, compiled programs) and its round step.

  A run is a pure function of (config, seed): every random stream is derived from the seed and the
  round number, so the state to save between rounds is only (round, variables, method state).
  """

  def __init__(self, config, share_data_with: "Experiment | None" = None):
    """`share_data_with`: an Experiment of the same `config.data` and strategy whose dataset and
    device copies of the images this one reuses (runs batched together need only one)."""
    config_lib.validate(config)
    self.config = config
    self.task = get_task(config.task)
    self.strategy = strategies.resolve_strategy(config.fl.strategy)
    shared = share_data_with
    if shared is not None and (config.data.to_dict() != shared.config.data.to_dict()
                               or self.strategy != shared.strategy):
      raise ConfigError("Runs batched together must share config.data and the client-parallel "
                        f"strategy (seeds {shared.config.seed} and {config.seed} do not).")
    # Process 0 first: it builds the dataset cache that the other processes then read.
    self.dataset = dataset = distributed.primary_first(lambda: load_dataset(config.data)) \
        if shared is None else shared.dataset
    self.setup = build_federation(config, dataset, self.task,
                                  strategies.client_padding(self.strategy))
    self.layout = layout = self.setup.layout
    logging.info("dataset %s: %d train / %d val / %d test images %s, %d classes; %d clients %s, "
                 "strategy %s on %s", dataset.name, len(dataset.train), len(dataset.val),
                 len(dataset.test), dataset.image_shape, dataset.num_classes,
                 layout.num_real_clients, layout.counts[:layout.num_real_clients].tolist(),
                 self.strategy, jax.devices())
    self.model = build_model({"name": config.model.name, "norm": config.model.norm,
                              "num_outputs": self.task.num_outputs(dataset.num_classes),
                              "width": config.model.width, "dtype": config.model.dtype})
    slow = cpu_slow_path_warning(config.model.name, dataset.image_shape[0])
    if slow and jax.default_backend() == "cpu":
      logging.warning(slow)
    self.run_key = jax.random.PRNGKey(config.seed)
    self.method = METHODS[config.method](config, self.setup)
    self.optimizer = optax.adamw(config.optim.lr, weight_decay=config.optim.weight_decay)
    chunk = min(config.eval.batch_size, max(len(dataset.val), len(dataset.test)))
    self._place_images(shared, chunk)
    self.eval_labels = {"val": dataset.val.labels, "test": dataset.test.labels}
    self._predict = inference.make_predict(self.model, self.task, self.image_mean,
                                           self.image_std, chunk)
    self._predict_clients = {
        with_features: inference.make_predict_clients(
            self.model, self.task, self.image_mean, self.image_std, config.augment,
            with_features=with_features, per_client_images=self.per_client_images)
        for with_features in (False, True)}
    self._device_image_index = (
        strategies.place_clients if self.per_client_images else strategies.place_replicated)(
            self.strategy, self.image_index)
    self.programs: dict[str, strategies.RoundProgram] = {}
    self.plots_dir = None  # set by `train_and_evaluate` when `config.plots` is True
    self._clients = None  # device copy of the method's client arrays

  def _place_images(self, shared: "Experiment | None", chunk: int):
    """The image statistics and the device copies of the images (`fl.image_layout`), reusing
    `shared`'s where they are the same. With the per-client layout a process reads only the
    training images of its own clients (plus, on process 0, those of no client, so that the
    statistics summed over processes cover the whole training split), once."""
    dataset, layout = self.dataset, self.layout
    images = dataset.train.images
    self.per_client_images = resolve_image_layout(self.config.fl.image_layout) == "per_client"
    if self.per_client_images:  # the blocks follow this run's partition: never shared
      own = strategies.process_client_rows(self.strategy, len(layout.sample_index))
      stat_rows = np.unique(layout.sample_index[own][layout.valid[own]])
      if distributed.is_primary():
        unassigned = np.setdiff1d(np.arange(len(images)), layout.sample_index[layout.valid])
        stat_rows = np.union1d(stat_rows, unassigned)
      needed = np.union1d(layout.sample_index[own], stat_rows)
      local = images[needed]  # only these rows are read
      self.train_images = strategies.place_client_images(
          self.strategy, local, np.searchsorted(needed, layout.sample_index))
      image_index = np.broadcast_to(np.arange(layout.slots, dtype=np.int32), layout.valid.shape)
      logging.info("process %d of %d holds %d of %d training images (its clients')%s",
                   jax.process_index(), jax.process_count(), len(needed), len(images),
                   f"; {images.rows_read} read from disk" if isinstance(images, RowReader) else "")
    elif shared is not None and not shared.per_client_images:
      self.train_images, image_index = shared.train_images, layout.sample_index
    else:
      images = np.asarray(images)  # reads every row
      self.train_images = strategies.place_replicated(self.strategy, images)
      image_index = layout.sample_index
    self.image_index = np.ascontiguousarray(image_index)
    if shared is not None:
      self.image_mean, self.image_std = shared.image_mean, shared.image_std
    elif self.per_client_images:  # each process sums its rows (one process: all, in order)
      total, squares, count = channel_sums(local[np.searchsorted(needed, stat_rows)])
      sums = np.stack([total, squares, np.full_like(total, count)])
      self.image_mean, self.image_std = channel_stats(
          *distributed.gather_from_processes(sums).sum(0))
    else:
      self.image_mean, self.image_std = channel_stats(*channel_sums(images))
    self.eval_chunk = chunk
    if shared is not None and shared.eval_chunk == chunk:
      self.eval_images = shared.eval_images
    else:
      self.eval_images = {name: strategies.place_replicated(
                              self.strategy, inference.pad_to_multiple(np.asarray(split.images),
                                                                       chunk))
                          for name, split in (("val", dataset.val), ("test", dataset.test))}

  # State ---------------------------------------------------------------------------------------
  def initial_variables(self):
    variables = init_variables(self.model, jax.random.fold_in(self.run_key, STREAM_INIT),
                               self.dataset.image_shape)
    if self.config.model.pretrained:
      variables = load_pretrained(variables, self.config.model.pretrained)
    return strategies.place_replicated(self.strategy, variables)

  def host_arrays(self) -> dict:
    """The simulation's host-side arrays (saved with checkpoints, checked on resume)."""
    return {"sample_index": self.layout.sample_index, "valid": self.layout.valid,
            "corrupted": self.setup.corrupted, "annotated": self.setup.annotated,
            "observed_labels": self.setup.observed_labels}

  # Rounds --------------------------------------------------------------------------------------
  def program_for(self, phase: str, batched_runs: bool = False,
                  shard_runs: bool = False) -> strategies.RoundProgram:
    """The round program of a method phase (with a leading run axis when `batched_runs`, split
    over the devices when `shard_runs`)."""
    name = phase + (" (batched runs)" if batched_runs else "") + (" over devices" * shard_runs)
    if name not in self.programs:
      c = self.config
      client_update = local_training.make_client_update(
          model=self.model, method=self.method, phase=phase, optimizer=self.optimizer,
          local_epochs=c.fl.local_epochs, batch_size=c.fl.batch_size, augment_cfg=c.augment,
          image_mean=self.image_mean, image_std=self.image_std, scan_unroll=c.fl.scan_unroll)
      self.programs[name] = strategies.RoundProgram(
          self.strategy, client_update, self.method.aggregate, batched_runs,
          per_client_images=self.per_client_images, shard_runs=shard_runs)
    return self.programs[name]

  @property
  def compiled_programs(self) -> int:
    return sum(p.traces for p in self.programs.values())

  def compile_ahead(self, executor, from_round: int, variables, method_state) -> list:
    """Starts compiling, in `executor`'s threads, the round program of each method phase that the
    rounds from `from_round` on will enter and that is not compiled yet (`engine/compile_ahead.py`),
    for arguments like the next round's (`variables`, the client arrays of `method_state`): a
    phase whose arguments turn out different compiles at its first call, as without this. Returns
    the futures of the programs."""
    first_rounds = {}  # method phase -> the first round in it
    for rnd in range(from_round, self.config.rounds):
      first_rounds.setdefault(self.method.phase(rnd), rnd)
    later = {phase: rnd for phase, rnd in first_rounds.items()
             if phase not in self.programs or self.programs[phase].traces == 0}
    if not later:
      return []
    logging.info("compiling the round program of %s in the background",
                 ", ".join(f"phase {phase!r} (from round {rnd})" for phase, rnd in later.items()))
    clients = self.placed_clients(method_state)
    return [self.program_for(phase).compile_in(executor, variables, self.train_images, clients,
                                               self.round_scalars(rnd, method_state),
                                               self.round_key(rnd))
            for phase, rnd in later.items()]

  def placed_clients(self, method_state):
    """The device copy of the method's client arrays for `method_state`, placed once and reused
    until the method changes them (`before_round` / `after_round` report it)."""
    if self._clients is None:
      self._clients = strategies.place_clients(
          self.strategy, _device_clients(self.method, method_state, self.layout,
                                         self.image_index))
    return self._clients

  # The round key and the method's scalars go in as host values: every process passes the same.
  def round_key(self, rnd: int) -> np.ndarray:
    return np.asarray(jax.random.fold_in(jax.random.fold_in(self.run_key, STREAM_TRAIN), rnd))

  def round_scalars(self, rnd: int, method_state) -> dict:
    return {k: np.float32(v) for k, v in self.method.scalars(rnd, method_state).items()}

  def predict_train(self, variables, rnd: int, with_features: bool = False):
    """The global model's probabilities (and features) on every client's slots, weak view."""
    key = np.asarray(jax.random.fold_in(jax.random.fold_in(self.run_key, STREAM_REFINE), rnd))
    out = self._predict_clients[with_features](variables, self.train_images,
                                               self._device_image_index, key)
    return distributed.to_host(out)

  def run_round(self, rnd: int, variables, method_state):
    """Host step, then every client's local training and the aggregation of round `rnd`.

    Returns (variables, method_state, records) where records are metrics.jsonl lines.
    """
    inputs = self.prepare_round(rnd, variables, method_state)
    outputs = self.program_for(inputs.phase)(variables, self.train_images, inputs.clients,
                                             inputs.scalars, inputs.round_key)
    return self.finish_round(inputs, outputs)

  def prepare_round(self, rnd: int, variables, method_state) -> "RoundInputs":
    """The method's host step before round `rnd`, and the round program's inputs."""
    records = []
    ctx = RoundContext(round=rnd, global_vars=variables,
                       predict_train=lambda with_features=False: self.predict_train(
                           variables, rnd, with_features), plots_dir=self.plots_dir)
    method_state, changed, host_log = self.method.before_round(ctx, method_state)
    if host_log:
      records.append({"round": rnd, "split": "train", "kind": "refinement", **host_log})
    if changed:
      self._clients = None
    return RoundInputs(round=rnd, phase=self.method.phase(rnd), method_state=method_state,
                       clients=self.placed_clients(method_state),
                       scalars=self.round_scalars(rnd, method_state),
                       round_key=self.round_key(rnd), records=records)

  def finish_round(self, inputs: "RoundInputs", outputs):
    """Checks the round program's `outputs` and runs the method's `after_round`; returns
    (variables, method_state, records)."""
    rnd, records = inputs.round, list(inputs.records)
    new_variables, client_losses, _, client_outputs = outputs
    client_losses = distributed.to_host(client_losses)[:self.layout.num_real_clients]
    if not np.all(np.isfinite(client_losses)):
      bad = int(np.flatnonzero(~np.isfinite(client_losses))[0])
      raise NumericalError(rnd, bad, float(client_losses[bad]))
    records.append({"round": rnd, "split": "train", "phase": inputs.phase,
                    "client_loss": client_losses.tolist()})
    method_state, changed, host_log = self.method.after_round(
        rnd, inputs.method_state, distributed.to_host(client_outputs))
    if changed:
      self._clients = None  # rebuilt from the new state before the next round
    if host_log:
      records.append({"round": rnd, "split": "train", "kind": "after_round", **host_log})
    return new_variables, method_state, records

  def evaluate(self, variables) -> dict:
    out = {}
    for split in ("val", "test"):
      probs = distributed.to_host(self._predict(variables, self.eval_images[split]))
      out[split] = self.task.evaluate(probs[:len(self.eval_labels[split])],
                                      self.eval_labels[split])
    return out

  def should_evaluate(self, rnd: int) -> bool:
    return (rnd + 1) % self.config.eval.every == 0 or rnd == self.config.rounds - 1

  def summary(self, history: dict, seconds: float) -> dict:
    config, dataset = self.config, self.dataset
    last = config.rounds - 1
    best = _select_best(history, config.eval.select_on, self.task.headline_metric)
    keys = (*dict.fromkeys((self.task.headline_metric, *HEADLINE)), "classes_evaluated",
            "classes_skipped")
    pick = lambda m: {k: m[k] for k in keys}  # noqa: E731
    return {
        "method": config.method,
        "dataset": dataset.name,
        "classes": list(dataset.class_names),
        "rounds": config.rounds,
        "seed": config.seed,
        "num_clients": self.layout.num_real_clients,
        "noise_rate": config.labels.noise_rate,
        "annotation_num": config.labels.annotation_num or dataset.num_classes,
        "strategy": self.strategy,
        "image_layout": "per_client" if self.per_client_images else "shared",
        "backend": jax.default_backend(),
        "seconds": round(seconds, 2),
        "selected_on": config.eval.select_on,
        "best_val_round": best,
        "val_at_best": pick(history[best]["val"]) if best is not None else None,
        "test_final": pick(history[last]["test"]),
        "test_at_best_val": pick(history[best]["test"]) if best is not None else None,
        "test_class_prior": pick(self.task.prior_baseline(dataset.train.labels,
                                                          dataset.test.labels)),
        "compiled_programs": self.compiled_programs,
    }


class RunBatch:
  """Several runs advanced in lock-step: each round, every run's host step, then one program that
  trains all runs' clients (the round program vmapped over a leading run axis), then every run's
  `after_round`. Evaluation, logs and checkpoints stay per run.

  `RunBatch(configs)` builds one Experiment per config; they share the dataset and its device
  copies, so the configs must have the same `data`. Runs can share a program when they lower to
  the same one: the same data, model, method and schedule, and array shapes; typically runs that
  differ only in the seed or the label simulation (`labels.*`). This is checked, once per method
  phase, by comparing a hash of each run's lowered round program (constants included); a mismatch
  is a ConfigError, never a silently wrong run. Batched and separate runs compute the same function
  (tested); like the client-parallel strategies, they may differ in the last bits of
  floating-point results. Needs `fl.image_layout=shared` and one process.

  Layout: under `fl.strategy` `loop` the runs go one after another; under `vmap` they are
  vmapped; under `shard` (several devices) a number of runs that is a multiple of the device
  count is split over the devices, each device training its runs and their clients in turn
  (`shard_runs`: no vmap, so no grouped convolutions), and any other number is vmapped with each
  run's clients split over the devices.
  """

  def __init__(self, configs):
    if distributed.multi_process():
      raise ConfigError("Batched runs are single-process only; run them one after another.")
    first = Experiment(configs[0])
    if first.per_client_images:
      raise ConfigError("Batched runs need fl.image_layout=shared: per-client image blocks "
                        "follow each run's partition.")
    self.experiments = [first] + [Experiment(c, share_data_with=first) for c in configs[1:]]
    self._stacked_clients = (None, None)  # (the runs' client arrays, their stack)
    # Under `shard`, runs as many as (or a multiple of) the devices are split over them, each
    # device training its runs in turn; otherwise the runs are vmapped (the clients split).
    self.shard_runs = (first.strategy == "shard" and len(configs) % jax.device_count() == 0)
    self._checked_phases = set()

  def run_round(self, rnd: int, variables: list, method_states: list):
    """Round `rnd` of every run; returns lists (variables, method_states, records) per run."""
    inputs = [e.prepare_round(rnd, v, s)
              for e, v, s in zip(self.experiments, variables, method_states)]
    phase = inputs[0].phase
    if any(i.phase != phase for i in inputs):
      raise ConfigError(f"The batched runs are in different method phases at round {rnd} "
                        f"({sorted({i.phase for i in inputs})}); batch runs with one schedule.")
    first = self.experiments[0]
    if phase not in self._checked_phases:
      self._check_same_program(phase, variables, inputs)
      self._checked_phases.add(phase)
    place = strategies.place_runs if self.shard_runs else (lambda tree: tree)
    clients = [i.clients for i in inputs]
    if self._stacked_clients[0] is None or any(
        a is not b for a, b in zip(clients, self._stacked_clients[0])):
      self._stacked_clients = (clients, place(strategies.stack_trees(clients)))
    outputs = first.program_for(phase, batched_runs=True, shard_runs=self.shard_runs)(
        place(strategies.stack_trees(variables)), first.train_images, self._stacked_clients[1],
        place(strategies.stack_trees([i.scalars for i in inputs])),
        place(np.stack([i.round_key for i in inputs])))
    results = []
    for r, (e, i) in enumerate(zip(self.experiments, inputs)):
      run_outputs = jax.tree.map(lambda a, r=r: a[r], outputs)
      if self.shard_runs:  # from the device that trained it, to where the run's programs run
        run_outputs = (strategies.place_replicated(e.strategy, run_outputs[0]), *run_outputs[1:])
      results.append(e.finish_round(i, run_outputs))
    return tuple(list(column) for column in zip(*results))

  def _check_same_program(self, phase, variables, inputs):
    prints = [e.program_for(phase).fingerprint(v, e.train_images, i.clients, i.scalars,
                                               i.round_key)
              for e, v, i in zip(self.experiments, variables, inputs)]
    for e, fingerprint in zip(self.experiments[1:], prints[1:]):
      if fingerprint != prints[0]:
        raise ConfigError(
            f"The runs with seeds {self.experiments[0].config.seed} and {e.config.seed} compile to "
            f"different programs in phase {phase!r} (a different model, method setting, schedule "
            "or array shape); they cannot be batched. Run them separately.")


class NumericalError(UserError):
  """A client's training loss became NaN or infinite."""

  def __init__(self, rnd: int, client: int, value: float):
    self.round, self.client = rnd, client
    super().__init__(f"The training loss became {value} in round {rnd} on client {client}; the "
                     "results of that round were discarded.")


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs (or resumes) one federated experiment; returns the summary also written to summary.json.
  The workdir is locked while the run trains (`checkpointing.workdir_lock`). Ctrl-C stops it
  (KeyboardInterrupt) after the checkpoint write under way, also where Python would have dropped
  the interrupt (`checkpointing.ctrl_c_never_lost`: then at the next round's start)."""
  start = time.time()
  config_lib.validate(config)
  prepare_workdir(workdir)
  with (checkpointing.workdir_lock(workdir, shared_by_processes=distributed.multi_process()),
        checkpointing.ctrl_c_never_lost() as raise_lost_ctrl_c):
    return _train_and_evaluate(config, workdir, start, raise_lost_ctrl_c)


def _train_and_evaluate(config, workdir: str, start: float, raise_lost_ctrl_c) -> dict:
  resume_from = checkpointing.check_resume(config, workdir)
  experiment = Experiment(config)
  if config.plots and distributed.is_primary():
    experiment.plots_dir = os.path.join(workdir, "plots")
    os.makedirs(experiment.plots_dir, exist_ok=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint.every, config.checkpoint.keep)
  variables = experiment.initial_variables()
  method_state = experiment.method.init_state()
  history: dict[int, dict] = {}
  first_round, elapsed_before = 0, 0.0
  if resume_from:
    restored = ckpt.restore(variables, method_state, experiment.host_arrays())
    if restored is not None:
      first_round, variables, method_state, history, elapsed_before = restored
      logging.info("resuming %s at round %d", workdir, first_round)
  primary = distributed.is_primary()  # in a multi-host run, process 0 writes the files
  if primary:
    checkpointing.truncate_jsonl(metrics_path, first_round)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))
  metrics_log = JsonlWriter(metrics_path if primary else os.devnull)

  progress = tqdm(total=config.rounds, initial=first_round, desc=f"{config.method} rounds",
                  unit="round", file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
                  disable=os.environ.get("FEDNML_NO_PROGRESS") == "1" or not primary)
  # After the first round (whose program compiles at its call), the later phases' round programs
  # compile in the background while the rounds run (engine/compile_ahead.py).
  compiler = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile_ahead")
  try:
    for rnd in range(first_round, config.rounds):
      raise_lost_ctrl_c()
      try:
        variables, method_state, records = experiment.run_round(rnd, variables, method_state)
      except NumericalError as err:
        last = ckpt.latest_round()
        where = (f"The last good checkpoint (round {last}) is kept: fix the cause (e.g. a lower "
                 "--config.optim.lr) and rerun with --config.resume=force to continue from it."
                 if last is not None else "No checkpoint was written yet.")
        raise UserError(f"{err} ({config.method}, lr {config.optim.lr}). {where}") from None
      if rnd == first_round:
        experiment.compile_ahead(compiler, rnd + 1, variables, method_state)
      for record in records:
        metrics_log.write(record)
      losses = next(r["client_loss"] for r in records if "client_loss" in r)
      postfix = {"loss": f"{np.mean(losses):.4f}"}
      if experiment.should_evaluate(rnd):
        history[rnd] = experiment.evaluate(variables)
        for split, result in history[rnd].items():
          metrics_log.write({"round": rnd, "split": split, "metrics": result})
        postfix["val_mAP"] = f"{history[rnd]['val']['mAP']:.4f}"
      if (rnd + 1) % config.checkpoint.every == 0 or rnd == config.rounds - 1:
        ckpt.save(rnd + 1, variables, method_state, experiment.host_arrays(), history,
                  elapsed_before + time.time() - start)
      progress.set_postfix(postfix, refresh=False)
      progress.update(1)
  finally:
    progress.close()
    compiler.shutdown(wait=False, cancel_futures=True)
    ckpt.close()  # waits for the last save; raises if it failed
  summary = experiment.summary(history, elapsed_before + time.time() - start)
  summary["resumed_from_round"] = first_round if resume_from else None
  if primary:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=_json_default)
  return summary


def run_comparison(config, workdir: str) -> list[dict]:
  """Runs `config` once per method of `config.compare` (in `workdir/<method>/`), or once."""
  methods = [m for m in config.compare.split(",") if m]
  if not methods:
    return [train_and_evaluate(config, workdir)]
  config_lib.validate(config)
  summaries = []
  for method in methods:
    single = config.copy_and_resolve_references()
    single.method, single.compare = method, ""
    summaries.append(train_and_evaluate(single, os.path.join(workdir, method)))
  return summaries


def summary_table(summaries: list[dict]) -> str:
  """The results table printed at the end of a run: one block of rows per method."""
  rows = []
  for summary in summaries:
    rows.append((f"{summary['method']}: test, final round", summary["test_final"]))
    if summary["test_at_best_val"] is not None:
      rows.append((f"{summary['method']}: test, best val (r{summary['best_val_round']})",
                   summary["test_at_best_val"]))
  rows.append(("class-prior predictor: test", summaries[0]["test_class_prior"]))
  return format_table(rows)
