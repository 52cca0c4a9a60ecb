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

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from fednml_jax import config as config_lib
from fednml_jax.corruption import simulate_clients
from fednml_jax.data import load_dataset
from fednml_jax.engine import inference, local_training, strategies
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError, UserError
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.metrics import HEADLINE
from fednml_jax.models import build_model, init_variables, load_pretrained
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
    probe = os.path.join(workdir, ".write_test")
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
  sim = simulate_clients(dataset.train.labels, num_clients=config.fl.num_clients,
                         noise_rate=config.labels.noise_rate, annotation_num=annotation_num,
                         partition=config.labels.partition,
                         dirichlet_alpha=config.labels.dirichlet_alpha, seed=config.seed)
  layout = ClientLayout.from_indices(sim.client_indices, pad_clients_to=client_padding)
  return FederatedSetup(config=config, task=task, layout=layout,
                        observed_labels=sim.observed_labels, noisy_labels=sim.noisy_labels,
                        clean_labels=sim.clean_labels, corrupted=sim.corrupted,
                        annotated=layout.pad_clients(sim.annotated, False))


def channel_stats(images: np.ndarray):
  x = images.astype(np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
  return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def _device_clients(method, state, layout):
  per_sample, per_client = method.client_arrays(state)
  per_sample = dict(per_sample, sample_index=layout.sample_index, valid=layout.valid)
  return {"per_sample": per_sample, "per_client": per_client, "count": layout.counts}


def _select_best(history, select_on):
  """The round whose `select_on` mAP is highest (earliest on ties)."""
  best_round, best_value = None, -math.inf
  for rnd, split_metrics in sorted(history.items()):
    value = split_metrics[select_on]["mAP"]
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


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs one federated experiment; returns the summary that is also written to summary.json."""
  start = time.time()
  config_lib.validate(config)
  prepare_workdir(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))

  task = get_task(config.task)
  dataset = load_dataset(config.data)
  strategy = strategies.resolve_strategy(config.fl.strategy)
  setup = build_federation(config, dataset, task, strategies.client_padding(strategy))
  layout = setup.layout
  logging.info("dataset %s: %d train / %d val / %d test images %s, %d classes; %d clients (%s), "
               "strategy %s on %s", dataset.name, len(dataset.train), len(dataset.val),
               len(dataset.test), dataset.image_shape, dataset.num_classes,
               layout.num_real_clients, layout.counts[:layout.num_real_clients].tolist(),
               strategy, jax.devices())

  model = build_model({"name": config.model.name, "norm": config.model.norm,
                       "num_outputs": task.num_outputs(dataset.num_classes),
                       "width": config.model.width, "dtype": config.model.dtype})
  run_key = jax.random.PRNGKey(config.seed)
  variables = init_variables(model, jax.random.fold_in(run_key, STREAM_INIT), dataset.image_shape)
  if config.model.pretrained:
    variables = load_pretrained(variables, config.model.pretrained)

  method = METHODS[config.method](config, setup)
  image_mean, image_std = channel_stats(dataset.train.images)
  optimizer = optax.adamw(config.optim.lr, weight_decay=config.optim.weight_decay)
  train_images = jax.device_put(dataset.train.images)
  chunk = min(config.eval.batch_size, max(len(dataset.val), len(dataset.test)))
  eval_images = {name: jax.device_put(inference.pad_to_multiple(split.images, chunk))
                 for name, split in (("val", dataset.val), ("test", dataset.test))}
  eval_labels = {"val": dataset.val.labels, "test": dataset.test.labels}
  predict = inference.make_predict(model, task, image_mean, image_std, chunk)
  predict_clients = inference.make_predict_clients(model, task, image_mean, image_std,
                                                   config.augment)
  device_sample_index = jax.device_put(layout.sample_index)

  programs = {}

  def program_for(phase):
    if phase not in programs:
      client_update = local_training.make_client_update(
          model=model, method=method, phase=phase, optimizer=optimizer,
          local_epochs=config.fl.local_epochs, batch_size=config.fl.batch_size,
          augment_cfg=config.augment, image_mean=image_mean, image_std=image_std,
          scan_unroll=config.fl.scan_unroll)
      programs[phase] = strategies.RoundProgram(strategy, client_update, method.aggregate)
    return programs[phase]

  metrics_log = JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  state = method.init_state()
  clients = None
  history: dict[int, dict] = {}
  train_key = jax.random.fold_in(run_key, STREAM_TRAIN)
  refine_key = jax.random.fold_in(run_key, STREAM_REFINE)

  progress = tqdm(total=config.rounds, desc=f"{config.method} rounds", unit="round",
                  file=sys.stderr, mininterval=2.0, dynamic_ncols=True,
                  disable=os.environ.get("FEDNML_NO_PROGRESS") == "1")
  for rnd in range(config.rounds):
    ctx = RoundContext(
        round=rnd, global_vars=variables,
        predict_train=lambda v=variables, r=rnd: np.asarray(predict_clients(
            v, train_images, device_sample_index, jax.random.fold_in(refine_key, r))))
    state, changed, host_log = method.before_round(ctx, state)
    if host_log:
      metrics_log.write({"round": rnd, "split": "train", "kind": "refinement", **host_log})
    if clients is None or changed:
      clients = strategies.place_clients(strategy, _device_clients(method, state, layout))
    phase = method.phase(rnd)
    scalars = {k: jnp.float32(v) for k, v in method.scalars(rnd, state).items()}
    variables, client_losses, _ = program_for(phase)(
        variables, train_images, clients, scalars, jax.random.fold_in(train_key, rnd))
    client_losses = np.asarray(client_losses)[:layout.num_real_clients]
    if not np.all(np.isfinite(client_losses)):
      bad = int(np.flatnonzero(~np.isfinite(client_losses))[0])
      raise UserError(f"The training loss became {client_losses[bad]} in round {rnd} on client "
                      f"{bad} ({config.method}, lr {config.optim.lr}). Lower --config.optim.lr or "
                      "check the data; no results of this round were kept.")
    metrics_log.write({"round": rnd, "split": "train", "phase": phase,
                       "client_loss": client_losses.tolist()})
    postfix = {"loss": f"{client_losses.mean():.4f}"}
    if (rnd + 1) % config.eval.every == 0 or rnd == config.rounds - 1:
      history[rnd] = {}
      for split in ("val", "test"):
        probs = np.asarray(predict(variables, eval_images[split]))[:len(eval_labels[split])]
        result = task.evaluate(probs, eval_labels[split])
        history[rnd][split] = result
        metrics_log.write({"round": rnd, "split": split, "metrics": result})
      postfix["val_mAP"] = f"{history[rnd]['val']['mAP']:.4f}"
    progress.set_postfix(postfix, refresh=False)
    progress.update(1)
  progress.close()

  last = config.rounds - 1
  best = _select_best(history, config.eval.select_on)
  pick = lambda m: {k: m[k] for k in (*HEADLINE, "classes_evaluated", "classes_skipped")}  # noqa: E731
  summary = {
      "method": config.method,
      "dataset": dataset.name,
      "classes": list(dataset.class_names),
      "rounds": config.rounds,
      "seed": config.seed,
      "num_clients": layout.num_real_clients,
      "noise_rate": config.labels.noise_rate,
      "annotation_num": config.labels.annotation_num or dataset.num_classes,
      "strategy": strategy,
      "backend": jax.default_backend(),
      "seconds": round(time.time() - start, 2),
      "selected_on": config.eval.select_on,
      "best_val_round": best,
      "val_at_best": pick(history[best]["val"]) if best is not None else None,
      "test_final": pick(history[last]["test"]),
      "test_at_best_val": pick(history[best]["test"]) if best is not None else None,
      "test_class_prior": pick(task.prior_baseline(dataset.train.labels, dataset.test.labels)),
      "compiled_programs": sum(p.traces for p in programs.values()),
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=_json_default)
  return summary


def summary_table(summary: dict) -> str:
  rows = [(f"{summary['method']}: test, final round", summary["test_final"])]
  if summary["test_at_best_val"] is not None:
    rows.append((f"{summary['method']}: test, best val (r{summary['best_val_round']})",
                 summary["test_at_best_val"]))
  rows.append(("class-prior predictor: test", summary["test_class_prior"]))
  return format_table(rows)
