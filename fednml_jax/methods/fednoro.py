r"""FedNoRo (Wu, Zhou, Chen, Tang, Chen and Li, "FedNoRo: Towards Noise-Robust Federated Learning by
Addressing Class Imbalance and Label Noise Heterogeneity", IJCAI 2023), adapted to partially
annotated multi-label data (ALGORITHMS.md §3).

Reference: wnn2000/FedNoRo, `train_FedNoRo.py` (stages, client selection), `utils/losses.py`
(`LogitAdjust`, `LA_KD`), `utils/local_training.py` (`train_LA`, `train_FedNoRo`: the teacher
temperature), `utils/utils.py` (`sigmoid_rampup`), `utils/FedAvg.py` (`DaAgg`).

Schedule:
- **warm-up** (`rnd < warmup_rounds`, 10): every client trains with the logit-adjusted loss from its
  local class priors (`logit_adjusted_bce`); aggregation = `config.aggregation` (base class).
- **detection** (once, on the host before training round `warmup_rounds`): the global model's loss
  per (client, class) → K×C matrix → empty cells filled with the column minimum → min-max per
  column → 2-component GMM fitted with `random_state = 0..gmm_seeds−1` → noisy component = the
  larger sum of means → vote (`detect_noisy_clients`). A diagnostics record compares the detection
  with each client's true corruption rate.
- **robust** (`rnd >= warmup_rounds`): clean clients keep the logit-adjusted loss; noisy clients
  minimise `(1 − w_kd)·LA + w_kd·KD` with the frozen global model as teacher
  (`fednoro_client_loss`), `w_kd = kd_ceiling·exp(kd_exponent·(1 − ramp progress)²)` from
  `warmup_rounds` to `ramp_end`; aggregation = DaAgg (`aggregation.daagg`, weights = sample counts).
Which clients are noisy is a per-client array (`noisy`, 0/1) used as a mask inside the loss, so one
compiled program serves clean and noisy clients.

Multi-label adaptations (FedNoRo is single-label softmax):
- **Logit adjustment.** FedNoRo's `LogitAdjust` is `CE(z + τ·log π)` with π the client's class
  frequencies. Here each class is a Bernoulli output with prior `π_c` = the client's positive rate
  of class c on its observed labels (π and 1 − π clamped at 1e-12 in the logs), and the adjusted
  logit is `z' = z + τ·log π_c` where the target is 1 and `z' = z + τ·log(1 − π_c)` where it is 0
  (the form of FedNML's `LA_KD`, `fednml.logit_adjusted_kd_loss`); the loss is BCE-with-logits on
  `z'`, averaged over the client's annotated classes (missing classes masked out, as FedAvg). Note
  that this is not the binary form of Menon et al.'s adjustment (`z + τ·log(π/(1 − π))` for both
  targets); it follows this project's FedNML formulation so that the two methods' LA terms agree.
- **Distillation.** FedNoRo's `LA_KD` is `w·KL(softmax(t/0.8) ‖ softmax(z')) + (1 − w)·CE(z', y)`
  on the *adjusted* student logits z' (`reduction='batchmean'`), teacher = the received global model
  in eval mode on the same batch, temperature 0.8 on the teacher only. Here KL becomes the
  per-class Bernoulli KL `KL(σ(t_c/T) ‖ σ(z'_c))` (= BCE(σ(z'), σ(t/T)) minus the teacher's
  entropy: the same gradients as the BCE, but 0 when the student matches), `T = kd_temperature`
  (0.8), averaged over the annotated classes like the LA term. The weighting follows the reference:
  the LA term is scaled by `1 − w_kd` for noisy clients (not `LA + w_kd·KD`).
- **Detection loss.** FedNoRo attributes each sample's CE to its (single) observed class and
  averages per (client, class). Here a cell is the mean BCE of the global model's probabilities
  `σ(global(x_weak))` against the client's observed label of that class over all its samples
  (positives and negatives; log clamped at −100 as PyTorch), on the classes the client annotates;
  the other cells are "empty" and take the column minimum, as FedNoRo's classes without samples.
  The probabilities come from `ctx.predict_train()` (weak view, eval mode), as the reference runs
  the global model on the training set under its training transform.

Single-label tasks (`config.task = "singlelabel"`) get FedNoRo exactly as published: `LogitAdjust`
= softmax cross-entropy on `z + τ·log π` (`logit_adjusted_ce`), `LA_KD` = `w·KL(softmax(t/T) ‖
softmax(z')) + (1 − w)·CE(z', y)` (`softmax_kd`), and a detection cell (k, c) = the mean
cross-entropy of the global model over client k's samples whose observed label is c
(`client_class_losses_single_label`), empty where the client has none of class c.

Choices where the reference is silent or would fail (each logged in the detection record):
- **Vote.** As the reference: each fit yields a set of noisy clients; the set produced by the most
  fits wins (ties: the earliest seed). The record also gives each client's number of "noisy" votes.
- Fewer than 2 real clients, no class that separates the clients (every column constant after
  filling), or every GMM fit raising → no client is noisy. A constant column (e.g. a class that one
  client annotates alone, or none) carries no information and is set to 0 instead of the reference's
  0/0 = NaN; other columns are normalised as usual.
- If the vote flags every client, they all stay noisy (all distil), and DaAgg, having no clean
  client to measure distances to, is the plain sample-weighted mean (the reference would crash).
- The ramp ends at `ramp_end` (49, the reference's `--end 49`: full weight at round 49) or at the
  last round `config.rounds − 1` when the run is shorter, so short runs keep the whole ramp. The
  reference's exponent is −5 (`sigmoid_rampup`).
- The local optimiser, learning rate and batch size are the engine's (`config.optim`, `config.fl`):
  the reference uses Adam (lr 3e-4, weight decay 5e-4), batch 16, 5 local epochs.

Host state (plain numpy, checkpointable): `noisy` (K,) bool (all False until detection) and
`detected` (0/1).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fednml_jax import aggregation
from fednml_jax.losses import masked_class_mean
from fednml_jax.methods import common
from fednml_jax.methods.base import Method
from fednml_jax.methods.fednml import _bce_on_probabilities, kd_weight

PRIOR_EPS = 1e-12


# Device side: losses (pure, per sample) -----------------------------------------------------------
def adjusted_logits(logits, targets, class_prior, tau=1.0):
  """`z + τ·log π_c` where the target is 1, `z + τ·log(1 − π_c)` elsewhere; `class_prior` (C,) or
  (B, C). π and 1 − π are clamped at 1e-12 inside the logs (float32 cannot hold 1 − 1e-12, so a
  class positive on every sample would otherwise give log 0)."""
  prior = jnp.asarray(class_prior, jnp.float32)
  pos = jnp.log(jnp.clip(prior, PRIOR_EPS, 1.0))
  neg = jnp.log(jnp.clip(1.0 - prior, PRIOR_EPS, 1.0))
  shift = jnp.where(targets.astype(jnp.float32) == 1.0, pos, neg)
  return logits.astype(jnp.float32) + tau * shift


def logit_adjusted_bce(logits, targets, class_prior, class_mask, tau=1.0):
  """FedNoRo's `LogitAdjust` for sigmoid outputs: BCE-with-logits on `adjusted_logits`, mean over
  the classes where `class_mask` is 1; shape (B,)."""
  z = adjusted_logits(logits, targets, class_prior, tau)
  per_entry = optax.sigmoid_binary_cross_entropy(z, targets.astype(jnp.float32))
  return masked_class_mean(per_entry, class_mask)


def bernoulli_kd(student_logits, teacher_logits, temperature=0.8):
  """Per-entry `KL(σ(t/T) ‖ σ(z))` of independent Bernoulli outputs, from logits; shape of z.

  = BCE(σ(z), σ(t/T)) − H(σ(t/T)): FedNoRo's `F.kl_div(log_softmax(z'), softmax(t/0.8))` per class.
  The teacher receives no gradient."""
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  soft = jax.nn.sigmoid(teacher)
  cross = optax.sigmoid_binary_cross_entropy(student_logits.astype(jnp.float32), soft)
  entropy = optax.sigmoid_binary_cross_entropy(teacher, soft)
  return cross - entropy


def logit_adjusted_ce(logits, targets, class_prior, tau=1.0):
  """FedNoRo's `LogitAdjust` for softmax outputs: cross-entropy of `targets` (one-hot or soft) on
  `z + τ·log π` (π clamped at 1e-12 inside the log); shape (B,)."""
  prior = jnp.clip(jnp.asarray(class_prior, jnp.float32), PRIOR_EPS, 1.0)
  z = logits.astype(jnp.float32) + tau * jnp.log(prior)
  return optax.softmax_cross_entropy(z, targets.astype(jnp.float32))


def softmax_kd(student_logits, teacher_logits, temperature=0.8):
  """`KL(softmax(t/T) ‖ softmax(z))` per sample, shape (B,): FedNoRo's `F.kl_div(log_softmax(z'),
  softmax(t/0.8))` before the batch mean. The teacher receives no gradient."""
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  log_teacher = jax.nn.log_softmax(teacher)
  log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)


def fednoro_single_label_loss(logits, targets, teacher_logits, class_prior, noisy, w_kd, tau=1.0,
                              temperature=0.8):
  """Per-sample robust-phase loss of FedNoRo as published (softmax), shape (B,): `(1 − a)·CE(z', y)
  + a·KL(softmax(t/T) ‖ softmax(z'))` with `z' = z + τ·log π` and `a = noisy·w_kd`."""
  prior = jnp.clip(jnp.asarray(class_prior, jnp.float32), PRIOR_EPS, 1.0)
  z = logits.astype(jnp.float32) + tau * jnp.log(prior)
  ce = optax.softmax_cross_entropy(z, targets.astype(jnp.float32))
  kd = softmax_kd(z, teacher_logits, temperature)
  a = jnp.asarray(noisy, jnp.float32) * jnp.asarray(w_kd, jnp.float32)
  return (1.0 - a) * ce + a * kd


def fednoro_client_loss(logits, targets, teacher_logits, class_prior, class_mask, noisy, w_kd,
                        tau=1.0, temperature=0.8):
  """Per-sample robust-phase loss, shape (B,): `(1 − a)·LA + a·KD` with `a = noisy·w_kd`.

  A clean client (`noisy` = 0) gets exactly `logit_adjusted_bce`; a noisy one (`noisy` = 1)
  FedNoRo's `LA_KD`: KD is `bernoulli_kd` on the adjusted logits z', both terms averaged over the
  annotated classes. `noisy` is the client's 0/1 flag (a traced scalar: a mask, not a branch)."""
  z = adjusted_logits(logits, targets, class_prior, tau)
  la = masked_class_mean(optax.sigmoid_binary_cross_entropy(z, targets.astype(jnp.float32)),
                          class_mask)
  kd = masked_class_mean(bernoulli_kd(z, teacher_logits, temperature), class_mask)
  a = jnp.asarray(noisy, jnp.float32) * jnp.asarray(w_kd, jnp.float32)
  return (1.0 - a) * la + a * kd


# Host side: noisy-client detection (numpy) --------------------------------------------------------
def client_class_losses(probs, labels, valid, annotated):
  """(K, C) mean BCE of `probs` against `labels` per client and class over the client's valid
  samples, NaN where the client does not annotate the class or has no sample (an empty cell).

  `probs`, `labels`: (K, n_max, C); `valid`: (K, n_max) bool; `annotated`: (K, C) bool.
  BCE on probabilities with log clamped at −100 (PyTorch's `F.binary_cross_entropy`)."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels, np.float64)
  cells = np.asarray(valid, bool)[:, :, None] & np.asarray(annotated, bool)[:, None, :]
  bce = np.where(cells, _bce_on_probabilities(probs, labels), 0.0)
  count = cells.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, bce.sum(axis=1) / np.maximum(count, 1), np.nan)


def client_class_losses_single_label(probs, labels, valid):
  """(K, C) mean cross-entropy `−log p[y]` (log clamped at −100) per client over its valid samples
  whose observed class is c; NaN where the client has no such sample (FedNoRo's class-wise loss).

  `probs`, `labels` (one-hot): (K, n_max, C); `valid`: (K, n_max) bool."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels, np.float64) * np.asarray(valid, bool)[:, :, None]
  with np.errstate(divide="ignore"):
    per_sample = -np.maximum(np.log(np.sum(probs * labels, axis=-1, keepdims=True)), -100.0)
  total = np.sum(np.where(labels > 0, per_sample, 0.0), axis=1)
  count = labels.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def fill_empty_cells(matrix):
  """Empty (NaN) cells take their column's minimum (the reference's `np.nanmin(metrics[:, j])`);
  a column with no value at all becomes 0."""
  matrix = np.array(matrix, np.float64)
  for j in range(matrix.shape[1]):
    column = matrix[:, j]
    empty = np.isnan(column)
    if empty.all():
      column[:] = 0.0
    elif empty.any():
      column[empty] = np.nanmin(column)
  return matrix


def normalise_columns(matrix):
  """Min-max normalisation per column: `(m − min)/(max − min)`. Returns (normalised, constant),
  where `constant` (C,) bool marks columns with max = min, which are set to 0 (the reference would
  divide 0 by 0)."""
  matrix = np.asarray(matrix, np.float64)
  low, high = matrix.min(axis=0), matrix.max(axis=0)
  span = high - low
  constant = ~(span > 0)
  out = (matrix - low) / np.where(constant, 1.0, span)
  out[:, constant] = 0.0
  return out, constant


def vote_noisy_clients(features, num_seeds=9):
  """FedNoRo's vote: for `random_state` s = 0..num_seeds−1 fit `GaussianMixture(2)` on the client
  rows of `features` (K, C), call noisy the clients `predict`ed into the component with the larger
  sum of means; the set of noisy clients produced by the most fits wins (ties: the earliest seed).

  Returns `(noisy (K,) bool, votes (K,) int: fits that called each client noisy, failures: list of
  "seed s: error" strings)`. Fits that raise are left out; if all do, no client is noisy."""
  features = np.asarray(features, np.float64)
  num_clients = features.shape[0]
  votes = np.zeros(num_clients, np.int64)
  sets, failures = [], []
  for seed in range(num_seeds):
    assignment, gmm, reason = common.fit_two_component_gmm(features, seed)
    if reason is not None:
      failures.append(f"seed {seed}: {reason}")
      continue
    flagged = assignment == int(np.argmax(gmm.means_.sum(axis=1)))
    votes += flagged
    sets.append(tuple(np.flatnonzero(flagged).tolist()))
  noisy = np.zeros(num_clients, bool)
  if sets:
    counts = collections.Counter(sets)
    best = max(counts.values())
    winner = next(s for s in sets if counts[s] == best)  # the earliest seed among the most common
    noisy[list(winner)] = True
  return noisy, votes, failures


def detect_noisy_clients(loss_matrix, num_seeds=9):
  """The whole detection on the real clients' (K, C) loss matrix (NaN = empty cell).

  Returns a dict: `noisy` (K,) bool, `votes` (K,) int, `reason` (None, or why no client was
  flagged without a vote), `failures` (GMM fits that raised), `filled` and `normalised` (K, C),
  `constant_classes` (column indices set to 0)."""
  matrix = np.asarray(loss_matrix, np.float64)
  num_clients = matrix.shape[0]
  out = {"noisy": np.zeros(num_clients, bool), "votes": np.zeros(num_clients, np.int64),
         "reason": None, "failures": [], "filled": None, "normalised": None,
         "constant_classes": []}
  if num_clients < 2:
    out["reason"] = f"fewer than 2 real clients ({num_clients}): nothing to compare"
    return out
  if matrix.shape[1] == 0 or np.isinf(matrix).any():
    out["reason"] = "no usable loss matrix (no class, or infinite losses)"
    return out
  filled = fill_empty_cells(matrix)
  normalised, constant = normalise_columns(filled)
  out.update(filled=filled, normalised=normalised,
             constant_classes=np.flatnonzero(constant).tolist())
  if constant.all():
    out["reason"] = "every class column is constant across clients: no class separates them"
    return out
  noisy, votes, failures = vote_noisy_clients(normalised, num_seeds)
  out.update(votes=votes, failures=failures)
  if len(failures) == num_seeds:
    out["reason"] = f"every GMM fit failed ({failures[0]})"
    return out
  out["noisy"] = noisy
  return out






# The detection step, shared with MaskedOptim and FedELC ------------------------------------------
def detection_client_arrays(per_client: dict, class_prior, state: dict, num_clients: int) -> dict:
  """`per_client` plus the arrays the detection-based losses and aggregations read: the clients'
  class priors, their 0/1 `noisy` flags and the same 0/1 `detected` for every client (which lets
  a traced aggregation switch rules after detection)."""
  return dict(per_client, class_prior=class_prior,
              noisy=np.asarray(state["noisy"], np.float32),
              detected=np.full(num_clients, float(int(state["detected"])), np.float32))


def detect_from_predictions(*, method: str, setup, task, probs, gmm_seeds: int, rnd: int):
  """FedNoRo's detection from the global model's (K, n_max, C) probabilities on every client's
  slots: the (client, class) loss matrix (per-class BCE on annotated classes, or class-wise
  cross-entropy for a single-label task), `detect_noisy_clients`, and a `detection` record that
  compares the result with the simulation's ground truth. Returns (noisy (K,) bool over the
  layout's clients, padding False; record)."""
  layout = setup.layout
  num_real = layout.num_real_clients
  probs = np.asarray(probs, np.float64)[:num_real]
  labels = layout.gather(np.asarray(setup.observed_labels, np.float32))[:num_real]
  if task.name == "singlelabel":
    losses = client_class_losses_single_label(probs, labels, layout.valid[:num_real])
  else:
    losses = client_class_losses(probs, labels, layout.valid[:num_real],
                                 np.asarray(setup.annotated, bool)[:num_real])
  result = detect_noisy_clients(losses, gmm_seeds)
  noisy = np.zeros(layout.num_clients, bool)
  noisy[:num_real] = result["noisy"]
  if result["reason"] is not None:
    logging.warning("%s round %d: %s; every client is treated as clean.", method, rnd,
                    result["reason"])
  for failure in result["failures"]:
    logging.warning("%s round %d: GMM fit failed, left out of the vote (%s).", method, rnd,
                    failure)
  record = detection_record(setup, rnd, losses, result, gmm_seeds)
  logging.info("%s round %d: noisy clients %s (detection precision %s, recall %s; true corruption "
               "rate: flagged %s, clean %s)", method, rnd, record["noisy_clients"],
               common.fmt(record["precision"]), common.fmt(record["recall"]),
               common.fmt(record["mean_corruption_flagged"]),
               common.fmt(record["mean_corruption_clean"]))
  return noisy, record


def detect_once(method, ctx, state: dict):
  """The `before_round` of the methods built on FedNoRo's detection (`method.cfg.warmup_rounds`,
  `method.cfg.gmm_seeds`): detects the noisy clients once, before round `warmup_rounds`, and sets
  the state's `noisy` and `detected`."""
  if ctx.round < method.cfg.warmup_rounds or int(state["detected"]):
    return state, False, {}
  noisy, record = detect_from_predictions(method=method.name, setup=method.setup,
                                          task=method.task, probs=ctx.predict_train(),
                                          gmm_seeds=method.cfg.gmm_seeds, rnd=ctx.round)
  return dict(state, noisy=noisy, detected=np.int32(1)), True, {"detection": record}


def detection_record(setup, rnd, losses, result, gmm_seeds) -> dict:
  """The JSON record of one detection: the flagged and clean clients, each client's votes and
  true corruption rate, precision and recall against the clients the simulation corrupted at all,
  the loss matrix before and after normalisation, and why nothing was flagged, if so."""
  layout = setup.layout
  num_real = layout.num_real_clients
  corrupted = layout.gather(np.asarray(setup.corrupted, bool), fill=False)[:num_real]
  hits = corrupted.sum(axis=1)
  counts = layout.counts[:num_real]
  rates = hits / np.maximum(counts, 1)
  flagged = np.asarray(result["noisy"], bool)
  truth = hits > 0
  return {
      "round": rnd,
      "noisy_clients": np.flatnonzero(flagged).tolist(),
      "clean_clients": np.flatnonzero(~flagged).tolist(),
      "reason": result["reason"],
      "gmm_seeds": int(gmm_seeds),
      "gmm_failures": result["failures"],
      "constant_classes": result["constant_classes"],
      "precision": common.ratio((flagged & truth).sum(), flagged.sum()),
      "recall": common.ratio((flagged & truth).sum(), truth.sum()),
      "mean_corruption_flagged": common.mean_or_none(rates[flagged]),
      "mean_corruption_clean": common.mean_or_none(rates[~flagged]),
      "loss_matrix": common.nan_to_none(losses),
      "normalised": common.nan_to_none(result["normalised"]),
      "clients": [{"client": k, "noisy": bool(flagged[k]), "votes": int(result["votes"][k]),
                   "samples": int(counts[k]), "corrupted": int(hits[k]),
                   "corruption_rate": float(rates[k])} for k in range(num_real)],
  }


# The method ---------------------------------------------------------------------------------------
class FedNoRo(Method):
  """FedNoRo (ALGORITHMS.md §3); see the module docstring for the multi-label adaptation."""

  name = "fednoro"
  supported_tasks = ("multilabel", "singlelabel")  # sigmoid, per-class formulation

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.warmup_rounds = 10  # stage 1 (logit-adjusted loss everywhere); detection before this round
    c.ramp_end = 49  # w_kd reaches kd_ceiling at this round (reference: --begin 10 --end 49)
    c.kd_ceiling = 0.8  # the reference's --a
    c.kd_exponent = -5.0  # sigmoid_rampup: exp(−5·(1 − progress)²)
    c.kd_temperature = 0.8  # teacher probabilities σ(t / T) (the reference's softmax(t / 0.8))
    c.tau = 1.0  # logit-adjustment temperature: z + τ·log π
    c.gmm_seeds = 9  # GaussianMixture random_state = 0..gmm_seeds−1, majority vote
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = cfg = config.fednoro
    checks = [
        ("warmup_rounds", common.is_int(cfg.warmup_rounds) and cfg.warmup_rounds >= 0,
         "a non-negative integer"),
        ("ramp_end", common.is_int(cfg.ramp_end) and cfg.ramp_end >= 0, "a non-negative integer"),
        ("kd_ceiling", 0.0 <= cfg.kd_ceiling <= 1.0, "in [0, 1]"),
        ("kd_exponent", np.isfinite(cfg.kd_exponent) and cfg.kd_exponent <= 0.0,
         "finite and ≤ 0"),
        ("kd_temperature", np.isfinite(cfg.kd_temperature) and cfg.kd_temperature > 0.0,
         "positive"),
        ("tau", np.isfinite(cfg.tau) and cfg.tau >= 0.0, "non-negative"),
        ("gmm_seeds", common.is_int(cfg.gmm_seeds) and cfg.gmm_seeds >= 1, "a positive integer"),
    ]
    common.check_constants("fednoro", cfg, checks)
    if cfg.warmup_rounds == 0:
      logging.warning("config.fednoro.warmup_rounds = 0: noisy clients are detected with the "
                      "initial (untrained) global model.")
    layout = setup.layout
    observed = layout.gather(np.asarray(setup.observed_labels, np.float32))
    positives = observed.sum(axis=1)  # padding slots are 0
    # π_c per client; the loss clamps π and 1 − π at 1e-12 inside its logs.
    self.class_prior = (positives / np.maximum(layout.counts, 1)[:, None]).astype(np.float32)

  # Schedule ------------------------------------------------------------------------------------
  def phase(self, rnd: int) -> str:
    return "warmup" if rnd < self.cfg.warmup_rounds else "robust"

  def uses_teacher(self, phase: str) -> bool:
    return phase == "robust"

  def ramp_end(self) -> int:
    """`ramp_end`, or the last round when the run is shorter."""
    return min(int(self.cfg.ramp_end), int(self.config.rounds) - 1)

  def kd_weight(self, rnd: int) -> float:
    return kd_weight(rnd, warmup=self.cfg.warmup_rounds, end=self.ramp_end(),
                     ceiling=self.cfg.kd_ceiling, exponent=self.cfg.kd_exponent)

  def scalars(self, rnd: int, state: dict) -> dict:
    del state
    return {"w_kd": self.kd_weight(rnd)}

  # Host state ----------------------------------------------------------------------------------
  def init_state(self) -> dict:
    return {"noisy": np.zeros(self.setup.layout.num_clients, bool), "detected": np.int32(0)}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    per_sample, per_client = super().client_arrays(state)
    return per_sample, detection_client_arrays(per_client, self.class_prior, state,
                                               self.setup.layout.num_clients)

  def before_round(self, ctx, state: dict):
    return detect_once(self, ctx, state)

  # Device side ---------------------------------------------------------------------------------
  def client_loss(self, phase, *, logits, batch, client, teacher_logits, scalars):
    if self.task.name == "singlelabel":
      if phase == "warmup":
        return logit_adjusted_ce(logits, batch["targets"], client["class_prior"], tau=self.cfg.tau)
      return fednoro_single_label_loss(
          logits, batch["targets"], teacher_logits, client["class_prior"], client["noisy"],
          scalars["w_kd"], tau=self.cfg.tau, temperature=self.cfg.kd_temperature)
    if phase == "warmup":
      return logit_adjusted_bce(logits, batch["targets"], client["class_prior"],
                                client["class_mask"], tau=self.cfg.tau)
    return fednoro_client_loss(logits, batch["targets"], teacher_logits, client["class_prior"],
                               client["class_mask"], client["noisy"], scalars["w_kd"],
                               tau=self.cfg.tau, temperature=self.cfg.kd_temperature)

  def aggregate(self, client_vars, clients, global_vars):
    """`config.aggregation` until detection, DaAgg (sample-count weights, the detected noisy
    clients) afterwards; chosen by the traced `detected` flag, so only one branch runs."""
    per_client = clients["per_client"]

    def robust():
      weights = aggregation.client_weights(clients["count"], "sample_count")
      return aggregation.daagg(client_vars, weights, per_client["noisy"] > 0)

    def configured():
      return super(FedNoRo, self).aggregate(client_vars, clients, global_vars)

    return jax.lax.cond(jnp.max(per_client["detected"]) > 0, robust, configured)




