r"""FedDC ("FedDC: Label Noise Correction with Dynamic Clients for Federated Learning", 2024, the
title of its code's README; the code names no authors) on FedCorr (Xu, Chen, Wang, Xu, Tan and Shen, "FedCorr: Multi-Stage Federated
Learning for Label Noise Correction", CVPR 2022), adapted to partially annotated multi-label data
(ALGORITHMS.md §3).

Reference: gttrung/FedDC, `main.py` (the three stages), `util/local_training.py`
(`LocalUpdate.update_weights`: the noise-scaled proximal term, mixup; `--beta 5` from the
README's commands, the options' default being 0), `util/util.py` (`lid_term`,
`get_output`), `util/options.py` (defaults); compared with Xu-Jingyi/FedCorr, `main.py`, whose
pipeline FedDC keeps. FedDC's own addition, clients that *join* during training (`--num_new_users`,
`--joining_round`, the `loss_thresh` rule for newcomers), does not arise in this project's static
federation; without newcomers FedDC's `main.py` reduces to FedCorr's three stages, which is what
this module implements.

Stages, mapped onto rounds (the engine trains every client every round: full participation, where
the reference samples clients; say `P = preprocess_rounds`, `F = finetune_rounds`):
- **pre-processing** (`rnd < P`, phase "preprocess"; the reference's `--iteration1` = 5
  iterations). A round here is one reference iteration, in which every client trains once. Each
  client minimises its loss plus `β·μ_k·‖w − w_global‖` (`noise_scaled_proximal`: the L2 norm, not
  its square, over the trainable parameters; `μ_k` = the client's noise level estimated in the
  previous round, 0 in round 0; `β` = `beta`, 5). After local training (`local_output`, on the
  device) the client's own local model, in eval mode under the weak view (the reference's
  `get_output` reads the training set through its training transform), gives per-slot
  probabilities, their LID (`lid_mle`, the reference's `lid_term` with k = `lid_k`) and each
  sample's loss; `after_round` adds each client's mean LID to its accumulated LID and keeps the
  losses. Then, on the host before the next round (`before_round` of rounds 1..P; see "Engine
  note"): `GaussianMixture(2, random_state=config.seed)` on the accumulated LIDs, noisy clients =
  those not in the lower-mean component (`detect_noisy_clients_by_lid`) → for every noisy client, a
  2-component GMM on its per-sample losses, estimated noise level = the fraction of samples outside
  the lower-mean component (`estimate_noise_level`); clean clients get level 0 → with `correction`
  on, each noisy client relabels its `int(n·level·relabel_ratio)` highest-loss samples where the
  global model is confident (`relabel_selection`, `relabel_confident_entries`). The reference
  relabels right after the iteration with `netglob`, the global model after that iteration's
  aggregation, which is exactly `ctx.predict_train()` before the next round.
- **fine-tuning** (`P <= rnd < P + F`; the reference's `--rounds1`, `fine_tuning` on; `F = 0`
  skips the stage): no proximal term (the reference sets β = 0), and only the clients whose
  estimated noise level is at most `clean_set_thres` (0.1) enter the aggregation (their weights are
  multiplied by the per-client `aggregate_mask`; the other clients still train, since the engine
  runs every client, but their models are discarded). At the end (`before_round` of round `P + F`,
  with the global model after the last fine-tuning round) every sample of every noisy client is
  relabelled where the global model is confident.
- **usual training** (`rnd >= P + F`; `--rounds2`): FedAvg of every client on the corrected labels,
  no proximal term.
Phase "train" serves both later stages (one compiled program; the stage only changes the per-client
`aggregate_mask`); the round records name the stage.

Round counts. The reference's CIFAR-10 runs use 5 iterations, then `rounds1` = 500 and `rounds2`
= 450 rounds with `frac2` = 0.1 of the clients per round, so each client trains about 50 and 45
times. With full participation that is `finetune_rounds` = 50 and 45 rounds of usual training:
5 + 50 + 45 = 100 = this project's default `config.rounds`; the usual stage is whatever remains of
`config.rounds`. A run too short for a stage skips it (logged); for short runs shorten the stages
by config overrides (e.g. `feddc.preprocess_rounds = 1`, `feddc.finetune_rounds = 1`). Within a
pre-processing iteration the reference trains the clients one after another (`frac1 = 1/K`: the
global model is each client's model in turn); here they train in parallel from the same global
model and are averaged (sample-count FedAvg, the reference's `FedAvg(w_locals, dict_len)`).

Multi-label adaptations (FedCorr is single-label softmax):
- **Per-sample loss** = BCE-with-logits of the local model's outputs against the client's current
  targets, averaged over the classes the client annotates (`losses.masked_bce_with_logits`). (The
  reference applies `CrossEntropyLoss` to softmax *probabilities*, a double softmax; we take the
  proper loss.) As in the reference, the loss GMM reads the loss of the latest pre-processing round
  only: the reference resets `loss_accumulative_whole` at the start of every iteration, so only the
  LID accumulates across rounds.
- **LID** is computed on the sigmoid probability vectors over all C classes (the reference: the
  softmax vectors), so every client's points live in the same space and the LIDs compare.
- **Relabelling** is per entry. The reference replaces a selected sample's label by the argmax of
  the global model's softmax where the largest probability exceeds `confidence_thres` (0.5). Here
  each class is a two-way (Bernoulli) prediction, and the rule is the reference's for C = 2 applied
  class by class: an *annotated* entry (i, c) of a selected sample becomes `1[p_ic > 0.5]` where
  `max(p_ic, 1 − p_ic) > confidence_thres`, and keeps its label otherwise. With the default 0.5 that
  is every entry whose probability is not exactly 0.5; raise `confidence_thres` (e.g. to 0.9, as
  FedCorr's Clothing1M run does) to let only confident predictions replace labels. Classes the
  client does not annotate are never written (they stay 0 and out of its loss).
- **Mixup** (`mixup_alpha`, 1: the reference's published runs all use `--mixup`, `--alpha 1`): one
  λ ~ Beta(α, α) and one permutation per batch; the images of the weak view are mixed, and the loss
  is `λ·L(z, y) + (1 − λ)·L(z, y_perm)` with L the masked BCE. The free places of a partial batch
  (other samples of the client, weight 0 in the loss) may serve as mixing partners.

Choices where the reference is silent or would fail (reasons are logged in the round records):
- The proximal gradient at `w = w_global` is taken as 0 (a "safe" norm). Like the reference
  (`if batch_idx > 0`), the term is left out on the first batch of every local epoch.
- LID with fewer than `lid_k + 1` samples uses the `n − 1` neighbours there are (and `k = n − 1` in
  the estimator; the reference would keep k = 20 over fewer terms); a client with one sample has
  LID 0.
- Fewer than 2 real clients, non-finite or all-equal accumulated LIDs, or a GMM fit that raises →
  no client is noisy this round. A noisy client with fewer than 2 samples, all-equal losses or a
  failing loss GMM gets level 0.
- Ties in the loss ranking go to the earlier slot (a stable sort).
- If no client qualifies for the fine-tuning clean set, every client is aggregated (the reference
  would divide by zero).
- The local optimiser, learning rate, batch size and epochs are the engine's (`config.optim`,
  `config.fl`); the reference uses SGD (lr 0.03, momentum 0.5), batch 10 and 5 local epochs
  (6 in FedDC), so β = 5 does not weigh the same as there.

Engine note: the detection runs in `before_round`, not in `after_round` where its inputs arrive,
because `train_and_evaluate` reads the round's client losses from the last record `run_round`
returns, which an `after_round` record would replace (the same limitation `fedlsm.py` notes). The
numbers are the same: nothing trains between the two hooks.

Host state (plain numpy, checkpointable): `targets` (K, n_max, C), the label table the clients train
on (initially the observed labels); `lid_round` and `lid_accumulated` (K,), the latest
pre-processing round's mean LIDs and their running sum; `noisy` (K,) bool; `noise_level` (K,), the
per-client `mu`; `sample_loss` (K, n_max), the latest pre-processing losses; `aggregate_mask` (K,)
0/1.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fednml_jax import aggregation
from fednml_jax.losses import masked_bce_with_logits
from fednml_jax.methods import common
from fednml_jax.methods.base import Method

LID_EPS = 1e-6  # the reference's `eps` in `lid_term`


# Device side: pure functions --------------------------------------------------------------------
def lid_mle(points, valid, k: int):
  """Per-point local intrinsic dimensionality (Amsaleg et al.'s maximum-likelihood estimator, the
  reference's `lid_term(X, X, k)`), shape (n,): with d_1 <= … <= d_k the Euclidean distances from a
  point to its k nearest *other* valid points,
  `LID = −k / (Σ_j log(d_j / (d_k + 1e-6)) + 1e-6)`.

  `points` (n, D); `valid` (n,) bool (padding slots are neither points nor neighbours, and get 0);
  `k` static. With m < k + 1 valid points, k becomes m − 1 (0 neighbours: LID 0). As the reference
  drops the first of the sorted distances (the point itself, or a duplicate at distance 0: the same
  value), a duplicate neighbour at distance 0 gives log 0 = −inf and LID 0."""
  points = points.astype(jnp.float32)
  valid = jnp.asarray(valid, bool)
  n = points.shape[0]

  def row_distances(x):
    d = jnp.sqrt(jnp.sum(jnp.square(points - x), axis=-1))
    return jnp.where(valid, d, jnp.inf)

  # (n, n) from exact differences (no Gram-matrix cancellation), 64 rows at a time.
  distances = jax.lax.map(row_distances, points, batch_size=64)
  width = min(k + 1, n)
  nearest = -jax.lax.top_k(-distances, width)[0]  # ascending; column 0 is the point itself
  k_eff = jnp.minimum(k, jnp.sum(valid.astype(jnp.int32)) - 1)
  d_last = jnp.take(nearest, jnp.clip(k_eff, 0, width - 1), axis=1)
  used = jnp.arange(1, width) <= k_eff
  logs = jnp.where(used, jnp.log(nearest[:, 1:] / (d_last[:, None] + LID_EPS)), 0.0)
  lid = -k_eff.astype(jnp.float32) / (jnp.sum(logs, axis=1) + LID_EPS)
  return jnp.where(valid & (k_eff > 0), lid, 0.0)


def noise_scaled_proximal(params, global_params, mu, beta):
  """`β·μ·‖w − w_global‖` (the L2 norm over all trainable parameters, not its square; the
  reference's `beta * mu * sqrt(Σ ‖w − w_t‖²)`). Its gradient at `w = w_global` is 0 (the norm's
  is undefined there)."""
  squares = jax.tree.map(
      lambda w, g: jnp.sum(jnp.square(w.astype(jnp.float32) - g.astype(jnp.float32))),
      params, global_params)
  total = sum(jax.tree.leaves(squares), jnp.float32(0.0))
  positive = total > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1.0)), 0.0)
  return jnp.float32(beta) * jnp.asarray(mu, jnp.float32) * norm


def mixup_bce(logits, targets, permutation, lam, class_mask):
  """Mixup's per-sample loss `λ·L(z, y) + (1 − λ)·L(z, y[perm])`, L the masked BCE; shape (B,)."""
  own = masked_bce_with_logits(logits, targets, class_mask)
  partner = masked_bce_with_logits(logits, targets[permutation], class_mask)
  return lam * own + (1.0 - lam) * partner


# Host side: detection, noise estimate and relabelling (numpy) -------------------------------------
def detect_noisy_clients_by_lid(lid_accumulated, seed: int):
  """FedCorr's client detection: 2-component GMM on the clients' accumulated LIDs; noisy = not in
  the component with the lower mean. Returns (noisy (K,) bool, component means or None, reason or
  None); a degenerate fit flags nobody."""
  lid_accumulated = np.asarray(lid_accumulated, np.float64)
  assignment, gmm, reason = common.fit_two_component_gmm(lid_accumulated, seed)
  if reason is not None:
    return np.zeros(lid_accumulated.shape[0], bool), None, reason
  means = gmm.means_[:, 0]
  return assignment != int(np.argmin(means)), means.tolist(), None


def estimate_noise_level(sample_losses, seed: int):
  """FedCorr's per-client noise level: 2-component GMM on the client's per-sample losses; the
  samples outside the lower-mean component are the noisy ones. Returns (level, flagged (n,) bool,
  reason or None); a degenerate fit gives level 0 and flags nothing."""
  sample_losses = np.asarray(sample_losses, np.float64)
  assignment, gmm, reason = common.fit_two_component_gmm(sample_losses, seed)
  if reason is not None:
    return 0.0, np.zeros(sample_losses.shape[0], bool), reason
  flagged = assignment != int(np.argmin(gmm.means_[:, 0]))
  return float(flagged.mean()), flagged, None


def relabel_selection(sample_losses, noise_level: float, relabel_ratio: float):
  """(n,) bool: the `int(n·level·ratio)` samples with the highest loss (ties: the earlier one)."""
  sample_losses = np.asarray(sample_losses, np.float64)
  n = sample_losses.shape[0]
  count = int(n * noise_level * relabel_ratio)
  selected = np.zeros(n, bool)
  selected[np.argsort(-sample_losses, kind="stable")[:count]] = True
  return selected


def relabel_confident_entries(targets, probs, rows, annotated, confidence_thres: float):
  """Per-entry relabelling: an annotated entry (i, c) of a row with `rows[i]` becomes
  `1[p_ic > 0.5]` where `max(p_ic, 1 − p_ic) > confidence_thres`; other entries are kept.

  `targets`, `probs` (n, C); `rows` (n,) bool; `annotated` (C,) bool. Returns (new targets float32,
  written (n, C) bool)."""
  probs = np.asarray(probs, np.float64)
  confident = np.maximum(probs, 1.0 - probs) > confidence_thres
  written = (np.asarray(rows, bool)[:, None] & np.asarray(annotated, bool)[None, :] & confident)
  new = np.where(written, (probs > 0.5).astype(np.float32), np.asarray(targets, np.float32))
  return new.astype(np.float32), written






# The method ---------------------------------------------------------------------------------------
class FedDC(Method):
  """FedDC / FedCorr (ALGORITHMS.md §3); see the module docstring for the stages and adaptations."""

  name = "feddc"
  supported_tasks = ("multilabel",)  # sigmoid, per-class formulation

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.preprocess_rounds = 5  # --iteration1: rounds of LID detection, noise estimate and relabelling
    c.finetune_rounds = 50  # --rounds1 500 at frac2 0.1 ≈ 50 rounds of full participation; 0: skip
    c.beta = 5.0  # --beta: proximal coefficient β in β·μ_k·‖w − w_global‖ (pre-processing only)
    c.lid_k = 20  # lid_term's k: nearest neighbours in the LID estimator
    c.relabel_ratio = 0.5  # --relabel_ratio: relabel int(n·level·ratio) highest-loss samples
    c.confidence_thres = 0.5  # --confidence_thres: relabel an entry where max(p, 1 − p) > this
    c.clean_set_thres = 0.1  # --clean_set_thres: fine-tune on clients with level <= this
    c.correction = True  # --correction (FedCorr's default): relabel at all
    c.mixup_alpha = 1.0  # --mixup --alpha 1 (the published runs); 0: no mixup
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = cfg = config.feddc
    checks = [
        ("preprocess_rounds", common.is_int(cfg.preprocess_rounds) and cfg.preprocess_rounds >= 0,
         "a non-negative integer"),
        ("finetune_rounds", common.is_int(cfg.finetune_rounds) and cfg.finetune_rounds >= 0,
         "a non-negative integer"),
        ("beta", np.isfinite(cfg.beta) and cfg.beta >= 0.0, "finite and non-negative"),
        ("lid_k", common.is_int(cfg.lid_k) and cfg.lid_k >= 1, "a positive integer"),
        ("relabel_ratio", 0.0 <= cfg.relabel_ratio <= 1.0, "in [0, 1]"),
        ("confidence_thres", 0.0 <= cfg.confidence_thres < 1.0, "in [0, 1)"),
        ("clean_set_thres", 0.0 <= cfg.clean_set_thres <= 1.0, "in [0, 1]"),
        ("correction", isinstance(cfg.correction, bool), "True or False"),
        ("mixup_alpha", np.isfinite(cfg.mixup_alpha) and cfg.mixup_alpha >= 0.0,
         "finite and non-negative"),
    ]
    common.check_constants("feddc", cfg, checks)
    finetune_end = cfg.preprocess_rounds + cfg.finetune_rounds
    if finetune_end >= config.rounds:
      logging.warning(
          "feddc: preprocess_rounds + finetune_rounds = %d >= config.rounds = %d: %s.",
          finetune_end, config.rounds,
          "neither the relabelling after fine-tuning nor the usual training stage runs"
          if cfg.finetune_rounds else "the usual training stage never runs")

  # Schedule ------------------------------------------------------------------------------------
  def stage(self, rnd: int) -> str:
    if rnd < self.cfg.preprocess_rounds:
      return "preprocess"
    if rnd < self.cfg.preprocess_rounds + self.cfg.finetune_rounds:
      return "finetune"
    return "usual"

  def phase(self, rnd: int) -> str:
    return "preprocess" if rnd < self.cfg.preprocess_rounds else "train"

  # Host state ----------------------------------------------------------------------------------
  def init_state(self) -> dict:
    layout = self.setup.layout
    num_clients = layout.num_clients
    return {
        "targets": layout.gather(np.asarray(self.setup.observed_labels, np.float32)),
        "lid_round": np.zeros(num_clients, np.float64),
        "lid_accumulated": np.zeros(num_clients, np.float64),
        "noisy": np.zeros(num_clients, bool),
        "noise_level": np.zeros(num_clients, np.float64),
        "sample_loss": np.zeros((num_clients, layout.slots), np.float32),
        "aggregate_mask": np.ones(num_clients, np.float32),
    }

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    per_sample = {"targets": np.asarray(state["targets"], np.float32)}
    per_client = {"class_mask": self.setup.annotated.astype(np.float32),
                  "mu": np.asarray(state["noise_level"], np.float32),
                  "aggregate_mask": np.asarray(state["aggregate_mask"], np.float32)}
    return per_sample, per_client

  def after_round(self, rnd: int, state: dict, outputs: dict):
    """Pre-processing rounds: adds each client's mean LID (over its samples) to its accumulated
    LID and keeps the per-sample losses, for the detection in the next `before_round`."""
    if self.phase(rnd) != "preprocess":
      return state, False, {}
    layout = self.setup.layout
    valid = layout.valid
    lid = np.where(valid, np.asarray(outputs["lid"], np.float64), 0.0)
    lid_round = lid.sum(axis=1) / np.maximum(layout.counts, 1)
    new_state = dict(state, lid_round=lid_round,
                     lid_accumulated=np.asarray(state["lid_accumulated"], np.float64) + lid_round,
                     sample_loss=np.where(valid, np.asarray(outputs["loss"], np.float32), 0.0))
    return new_state, False, {}

  def detect(self, state: dict):
    """FedCorr's detection on the accumulated LIDs and the latest losses: returns (noisy (K,) bool,
    noise levels (K,), the detection record without its round)."""
    layout, seed = self.setup.layout, int(self.config.seed)
    num_real = layout.num_real_clients
    noisy = np.zeros(layout.num_clients, bool)
    noisy[:num_real], lid_means, lid_reason = detect_noisy_clients_by_lid(
        np.asarray(state["lid_accumulated"])[:num_real], seed)
    if lid_reason is not None:
      logging.warning("feddc: %s in the accumulated LIDs; no client is noisy.", lid_reason)
    noise_level = np.zeros(layout.num_clients)
    estimates = {}
    for k in np.flatnonzero(noisy):
      rows = layout.valid[k]
      noise_level[k], flagged, reason = estimate_noise_level(state["sample_loss"][k, rows], seed)
      estimates[int(k)] = (flagged, reason)
    record = self._detection_record(state, noisy, noise_level, lid_means, lid_reason, estimates)
    return noisy, noise_level, record

  def _detection_record(self, state, noisy, noise_level, lid_means, lid_reason, estimates):
    layout = self.setup.layout
    corrupted = layout.gather(np.asarray(self.setup.corrupted, bool), fill=False)
    label_errors = self._label_errors(state["targets"])
    clients, rates = [], []
    for k in range(layout.num_real_clients):
      rows = layout.valid[k]
      truth = corrupted[k, rows]
      flagged, reason = estimates.get(k, (None, None))
      rates.append(float(truth.mean()) if rows.any() else 0.0)
      clients.append({
          "client": k, "noisy": bool(noisy[k]), "lid": float(state["lid_round"][k]),
          "lid_accumulated": float(state["lid_accumulated"][k]),
          "estimated_noise_level": float(noise_level[k]),
          "corruption_rate": rates[-1],
          "label_error_rate": float(label_errors[k, rows].mean()) if rows.any() else 0.0,
          "loss_gmm_reason": reason,
          "flagged_samples": None if flagged is None else int(flagged.sum()),
          "flagged_precision": None if flagged is None else common.ratio((flagged & truth).sum(),
                                                                   flagged.sum()),
          "flagged_recall": None if flagged is None else common.ratio((flagged & truth).sum(),
                                                                truth.sum()),
      })
    rates = np.asarray(rates)
    flagged_clients = noisy[:layout.num_real_clients]
    levels = noise_level[:layout.num_real_clients]
    return {
        "noisy_clients": np.flatnonzero(flagged_clients).tolist(),
        "clean_clients": np.flatnonzero(~flagged_clients).tolist(),
        "lid_gmm_means": lid_means,
        "lid_gmm_reason": lid_reason,
        "mean_corruption_flagged": common.mean_or_none(rates[flagged_clients]),
        "mean_corruption_clean": common.mean_or_none(rates[~flagged_clients]),
        "noise_level_mean_abs_error": float(np.mean(np.abs(levels - rates))),
        "clients": clients,
    }

  def _label_errors(self, targets):
    """(K, n_max) bool: the sample's targets differ from the clean labels on an annotated class."""
    clean = self.setup.layout.gather(np.asarray(self.setup.clean_labels, np.float32))
    annotated = np.asarray(self.setup.annotated, bool)[:, None, :]
    return np.any((np.asarray(targets) != clean) & annotated, axis=-1)

  def before_round(self, ctx, state: dict):
    """After each pre-processing round (rounds 1..P): detection, noise levels and relabelling with
    the global model this round receives; at the stage changes: the fine-tuning clean set's
    aggregation mask, and the relabelling after fine-tuning."""
    rnd, cfg = ctx.round, self.cfg
    detect = 1 <= rnd <= cfg.preprocess_rounds
    finetune_start = cfg.finetune_rounds > 0 and rnd == cfg.preprocess_rounds
    finetune_end = cfg.finetune_rounds > 0 and rnd == cfg.preprocess_rounds + cfg.finetune_rounds
    if not (detect or finetune_start or finetune_end):
      return state, False, {}
    layout = self.setup.layout
    new_state = dict(state)
    record = {"stage": self.stage(rnd)}
    if detect:
      new_state["noisy"], new_state["noise_level"], det = self.detect(state)
      record["detection"] = {"measured_round": rnd - 1, **det}
      logging.info("feddc round %d: noisy clients %s, estimated levels %s (true corruption "
                   "rates %s)", rnd, det["noisy_clients"],
                   [round(c["estimated_noise_level"], 3) for c in det["clients"]],
                   [round(c["corruption_rate"], 3) for c in det["clients"]])
    relabel_kind = None
    if detect and cfg.correction:
      relabel_kind = "preprocess"
    elif finetune_end and cfg.correction:
      relabel_kind = "finetune_end"
    if relabel_kind is not None:
      # One device pass, and none when no client is noisy (nothing to relabel).
      noisy = np.any(new_state["noisy"])
      probs = np.asarray(ctx.predict_train(), np.float64) if noisy else None
      new_state["targets"], record["relabel"] = self._relabel(new_state, probs, relabel_kind)
      overall = record["relabel"]
      logging.info("feddc round %d (%s relabelling): %d entries written, %d changed (%s now "
                   "right); annotated label accuracy %s → %s", rnd, relabel_kind,
                   overall["written_entries"], overall["changed_entries"],
                   common.fmt(overall["changed_correct_rate"]),
                   common.fmt(overall["label_acc_before"]),
                   common.fmt(overall["label_acc_after"]))
    if finetune_start:
      levels = np.asarray(new_state["noise_level"])
      real = layout.counts > 0
      clean_set = real & (levels <= cfg.clean_set_thres)
      reason = None
      if not clean_set.any():
        reason = (f"no client has an estimated noise level <= clean_set_thres = "
                  f"{cfg.clean_set_thres}: every client is aggregated")
        logging.warning("feddc round %d: %s.", rnd, reason)
        clean_set = real
      new_state["aggregate_mask"] = clean_set.astype(np.float32)
      record["finetune_clients"] = np.flatnonzero(clean_set).tolist()
      record["finetune_reason"] = reason
    if finetune_end:
      new_state["aggregate_mask"] = np.ones(layout.num_clients, np.float32)
    return new_state, True, record

  def _relabel(self, state, probs, kind: str):
    """Relabels the noisy clients' targets (`kind`: "preprocess" = the highest-loss samples,
    "finetune_end" = every sample) and measures the change against the clean labels."""
    setup, layout, cfg = self.setup, self.setup.layout, self.cfg
    targets = np.array(state["targets"], np.float32)
    clean = layout.gather(np.asarray(setup.clean_labels, np.float32))
    corrupted = layout.gather(np.asarray(setup.corrupted, bool), fill=False)
    totals = dict.fromkeys(("selected", "selected_corrupted", "written", "changed",
                            "changed_correct", "annotated", "correct_before", "correct_after"), 0)
    clients = []
    for k in np.flatnonzero(np.asarray(state["noisy"], bool)):
      rows = layout.valid[k]
      annotated = np.asarray(setup.annotated[k], bool)
      before = targets[k, rows]
      if kind == "preprocess":
        selected = relabel_selection(state["sample_loss"][k, rows], state["noise_level"][k],
                                     cfg.relabel_ratio)
      else:
        selected = np.ones(before.shape[0], bool)
      after, written = relabel_confident_entries(before, probs[k, rows], selected, annotated,
                                                 cfg.confidence_thres)
      targets[k, rows] = after
      truth = clean[k, rows]
      changed = after != before
      counts = {
          "selected": int(selected.sum()),
          "selected_corrupted": int((selected & corrupted[k, rows]).sum()),
          "written": int(written.sum()),
          "changed": int(changed.sum()),
          "changed_correct": int((changed & (after == truth)).sum()),
          "annotated": int(annotated.sum()) * int(rows.sum()),
          "correct_before": int(((before == truth) & annotated).sum()),
          "correct_after": int(((after == truth) & annotated).sum()),
      }
      for key, value in counts.items():
        totals[key] += value
      clients.append({"client": int(k), **_relabel_rates(counts)})
    return targets, {"kind": kind, **_relabel_rates(totals), "clients": clients}

  # Device side ---------------------------------------------------------------------------------
  def local_loss(self, phase, ctx):
    x = ctx.view("weak")
    targets, class_mask = ctx.batch["targets"], ctx.frame.client["class_mask"]
    if self.cfg.mixup_alpha == 0:
      logits, _ = ctx.student(x)
      return masked_bce_with_logits(logits, targets, class_mask), {}
    lam_key, perm_key = jax.random.split(jax.random.fold_in(ctx.key, 1))
    alpha = self.cfg.mixup_alpha
    lam = jax.random.beta(lam_key, alpha, alpha)
    permutation = jax.random.permutation(perm_key, x.shape[0])
    logits, _ = ctx.student(lam * x + (1.0 - lam) * x[permutation])
    return mixup_bce(logits, targets, permutation, lam, class_mask), {}

  def penalty(self, phase, *, params, global_params, client, scalars, epoch_step):
    del scalars
    if phase != "preprocess":  # the reference sets β = 0 after pre-processing
      return jnp.float32(0.0)
    # The reference adds the term from the second batch of each local epoch on (`batch_idx > 0`).
    term = noise_scaled_proximal(params, global_params, client["mu"], self.cfg.beta)
    return jnp.where(epoch_step > 0, term, 0.0)

  def local_output(self, phase, local, *, frame, variables, key):
    """Pre-processing: the local model's per-slot LID and loss (weak view, eval mode)."""
    if phase != "preprocess":
      return {}
    del local
    logits, _ = frame.predict_all(variables, "weak", key)
    valid = frame.per_sample["valid"]
    probs = self.task.probabilities(logits)
    loss = masked_bce_with_logits(logits, frame.per_sample["targets"], frame.client["class_mask"])
    return {"lid": lid_mle(probs, valid, self.cfg.lid_k), "loss": jnp.where(valid, loss, 0.0)}

  def aggregate(self, client_vars, clients, global_vars):
    """`config.aggregation` with `fl.client_weighting` weights times the per-client
    `aggregate_mask` (fine-tuning: the clean set only)."""
    del global_vars
    weights = aggregation.client_weights(clients["count"], self.config.fl.client_weighting)
    weights = weights * clients["per_client"]["aggregate_mask"]
    return aggregation.aggregate_by_name(self.config.aggregation, client_vars, weights,
                                         **self.config.aggregation_options)


def _relabel_rates(c: dict) -> dict:
  return {
      "selected_samples": c["selected"],
      "selected_corrupted_rate": common.ratio(c["selected_corrupted"], c["selected"]),
      "written_entries": c["written"],
      "changed_entries": c["changed"],
      "changed_correct_rate": common.ratio(c["changed_correct"], c["changed"]),
      "label_acc_before": common.ratio(c["correct_before"], c["annotated"]),
      "label_acc_after": common.ratio(c["correct_after"], c["annotated"]),
  }




