r"""FedNML: federated multi-label learning with noisy and missing labels (ALGORITHMS.md §2).

Reference: Hmxki/FedNML, `src/update_ours_all.py` (`LocalUpdate.correct_labels_with_Gmm`,
`LocalUpdate.update_weights`, loss class `LA_KD`) and `src/train_FedNML.py` (the KD ramp).

Two phases:
- **warm-up** (`rnd < warmup_rounds`): BCE-with-logits on the annotated classes, as FedAvg.
- **refine** (`rnd >= warmup_rounds`): every client trains on its label table `Ŷ` with a
  logit-adjusted BCE plus distillation from the frozen global model (`logit_adjusted_kd_loss`).
  On rounds `warmup_rounds + j·refine_every` the table is refined on the host before training
  (`before_round`): global-model probabilities `p` on the weak view → per-sample consistency and
  loss → 2-component GMM → noisy samples get hybrid pseudo-labels on their annotated classes, and
  every sample's missing classes move towards the pseudo-labels (`Ŷ ← 0.2·q + 0.8·Ŷ`); the class
  counts of the logit adjustment follow `n_c ← w_kd·Σ_i Ŷ_ic + (1 − w_kd)·n_c`.

Host state (plain numpy, checkpointable): `label_table` (K, n_max, C) float32, `class_counts`
(K, C) float32 and `refinements` (int). `client_arrays` gives the clients their table as
`targets`, their annotated classes as `class_mask` and `π_c = n_c / n_k` as `class_prior`, so the
device recomputes nothing.

**`reference_label_init` (compatibility switch, off by default).** The reference copies the label
table from the labels *before* missing classes are masked (`deepcopy(dataset).targets`), so the
hidden positives of the classes a client never annotates leak into phase 2 (with weight 0.8^k after
k refinements) and into the initial class counts. By default we start `Ŷ` from the masked,
observed labels. `reference_label_init=True` starts it (and the initial class counts) from the
noisy labels before masking, reproducing the reference's leak, so one can measure how much of the
paper's margin it explains. It changes nothing else: the warm-up loss and the first refinement's
features only read annotated classes, where both tables agree.

Details that follow the reference where the paper is silent:
- The logit adjustment of `LA_KD` uses `target == 1` exactly: an entry whose (soft) target is not
  exactly 1 — a soft pseudo-label like 0.7, or a missing class after the moving average — is
  adjusted with `log(1 − π_c)` as a negative, while both loss terms use the soft target as is.
- Phase-2 losses are means over **all** classes (the reference's `kd_loss.mean()` and
  `cls_loss.mean()`; its active-class restriction is commented out).
- Consistency and loss features read the annotated classes at the first refinement and all classes
  afterwards (the reference's `global_round == 10` test; here: the first refinement of the run).

Deliberate differences (documented so numbers can be compared):
- The distillation term `BCE(σ(z'), σ(teacher))` is computed from the logits
  (`optax.sigmoid_binary_cross_entropy`), which is the same function as PyTorch's
  `F.binary_cross_entropy(sigmoid(z'), ·)` wherever float32's sigmoid does not saturate; PyTorch
  clamps the log at −100 and loses the gradient once σ(z') rounds to 0 or 1, the logit form does not.
- The KD ramp ends at `config.rounds` (the reference hard-codes 100), so short runs keep its shape.
- A client whose GMM cannot be fitted meaningfully (fewer than `MIN_GMM_SAMPLES` samples, fewer than
  two distinct feature rows, non-finite features, a fit that raises or does not converge) flags no
  noisy samples this refinement; the reason is logged. Its missing classes are still refined.
- Aggregation is the engine's default (`fl.client_weighting`); the reference's unweighted mean is
  `fl.client_weighting = "uniform"` (identical under the IID partition's equal client sizes).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fednml_jax import plots
from fednml_jax.methods import common
from fednml_jax.methods.base import Method

# A 2-component full-covariance GMM in 2-D has 11 parameters; below this many samples its fit says
# nothing useful about the client, so the client flags no noisy samples.
MIN_GMM_SAMPLES = 4
PROB_LOG_FLOOR = -100.0  # PyTorch's F.binary_cross_entropy clamps log(p) at −100


# Pure pieces (host: numpy; device: jnp) -----------------------------------------------------------
def kd_weight(rnd, *, warmup: int, end: int, ceiling: float = 0.8, exponent: float = -2.0) -> float:
  """`ceiling · exp(exponent · (1 − (clip(rnd, warmup, end) − warmup)/(end − warmup))²)`.

  The reference's `0.8 · sigmoid_rampup(epoch, 10, 100)` (`train_FedNML.py`), with the ramp ending at
  `end` (= config.rounds). With `end <= warmup` there is nothing to ramp over: the full `ceiling`.
  """
  if end <= warmup:
    return float(ceiling)
  current = min(max(float(rnd), float(warmup)), float(end))
  phase = 1.0 - (current - warmup) / (end - warmup)
  return float(ceiling * math.exp(exponent * phase * phase))


def _bce_on_probabilities(probs, labels):
  """PyTorch's `F.binary_cross_entropy(probs, labels, reduction='none')` (log clamped at −100)."""
  with np.errstate(divide="ignore"):
    log_p = np.maximum(np.log(probs), PROB_LOG_FLOOR)
    log_not_p = np.maximum(np.log1p(-probs), PROB_LOG_FLOOR)
  return -(labels * log_p + (1.0 - labels) * log_not_p)


def consistency_and_loss(probs: np.ndarray, labels: np.ndarray, class_mask=None):
  """Per-sample consistency `c_i` and loss `ℓ_i` of the global model with the label table.

  `c_i = mean_c[Ŷ_ic·p_ic + (1−Ŷ_ic)(1−p_ic)]`, `ℓ_i = mean_c BCE(p_ic, Ŷ_ic)`, the means over the
  classes where `class_mask` (C,) is true (all classes when None). `probs`, `labels`: (n, C).
  Returns two float64 arrays of shape (n,).
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels, np.float64)
  if class_mask is None:
    class_mask = np.ones(probs.shape[-1], bool)
  cols = np.asarray(class_mask, bool)
  if not cols.any():  # nothing annotated: fall back to all classes rather than divide by zero
    cols = np.ones_like(cols)
  p, y = probs[:, cols], labels[:, cols]
  consistency = (y * p + (1.0 - y) * (1.0 - p)).mean(axis=1)
  loss = _bce_on_probabilities(p, y).mean(axis=1)
  return consistency, loss


def fit_noise_gmm(features: np.ndarray, seed: int = 0):
  """Splits samples into clean and noisy with a 2-component Gaussian mixture.

  `features` (n, 2) = `[c_i, −ℓ_i]`. As the reference: `GaussianMixture(n_components=2,
  random_state=seed)` (full covariance, fitted from scratch), the noisy component is the one with
  the lower mean consistency (feature 0), samples are assigned by `predict`.

  Returns `(noisy, reason, gmm)`: a bool mask (n,); None, or a short reason why the fit was
  skipped (then `noisy` is all False); and the fitted mixture (None when skipped).
  """
  assignment, gmm, reason = common.fit_two_component_gmm(
      features, seed, min_samples=MIN_GMM_SAMPLES, require_convergence=True)
  if reason is not None:
    return np.zeros(np.shape(features)[0], bool), reason, None
  noisy_component = int(np.argmin(gmm.means_[:, 0]))
  return assignment == noisy_component, None, gmm


def hybrid_pseudo_labels(probs: np.ndarray, high: float = 0.9, low: float = 0.1) -> np.ndarray:
  """`q = p`, with `q > high → 1` and `q < low → 0`; soft in between (the reference's `arr`)."""
  probs = np.asarray(probs, np.float64)
  return np.where(probs > high, 1.0, np.where(probs < low, 0.0, probs))


def refine_label_table(table: np.ndarray, pseudo: np.ndarray, noisy: np.ndarray,
                       annotated: np.ndarray, momentum: float = 0.8) -> np.ndarray:
  """One client's refined table (n, C), float64; the inputs are not modified.

  Noisy samples: `Ŷ[i, annotated] = q[i, annotated]`. Every sample, missing classes:
  `Ŷ[i, missing] = (1 − momentum)·q[i, missing] + momentum·Ŷ[i, missing]`.
  """
  table = np.asarray(table, np.float64)
  pseudo = np.asarray(pseudo, np.float64)
  noisy = np.asarray(noisy, bool)
  annotated = np.asarray(annotated, bool)
  out = table.copy()
  rows_cols = np.ix_(noisy, annotated)
  out[rows_cols] = pseudo[rows_cols]
  missing = ~annotated
  out[:, missing] = (1.0 - momentum) * pseudo[:, missing] + momentum * table[:, missing]
  return out


def update_class_counts(counts: np.ndarray, table: np.ndarray, w_kd: float) -> np.ndarray:
  """`n_c ← w_kd·Σ_i Ŷ_ic + (1 − w_kd)·n_c` over one client's samples (`table` (n, C))."""
  counts = np.asarray(counts, np.float64)
  return w_kd * np.asarray(table, np.float64).sum(axis=0) + (1.0 - w_kd) * counts


def logit_adjusted_kd_loss(logits, targets, teacher_logits, class_prior, w_kd, tau=1.0):
  """Per-sample phase-2 loss of FedNML (the reference's `LA_KD.forward`), shape (B,).

  `z' = z + tau·log π_c` where the target is exactly 1 and `z + tau·log(1 − π_c)` otherwise (π
  clamped at 1e-12 inside the logs); `L = w_kd·BCE(σ(z'), σ(teacher)) + (1 − w_kd)·BCEWithLogits(z',
  Ŷ)`, averaged over all classes. `class_prior` (C,) or (B, C); `w_kd` a scalar.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  prior = jnp.asarray(class_prior, jnp.float32)
  pos_shift = tau * jnp.log(jnp.maximum(prior, 1e-12))
  neg_shift = tau * jnp.log(jnp.maximum(1.0 - prior, 1e-12))
  adjusted = logits + jnp.where(targets == 1.0, pos_shift, neg_shift)
  soft_teacher = jax.nn.sigmoid(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
  distill = optax.sigmoid_binary_cross_entropy(adjusted, soft_teacher)
  supervised = optax.sigmoid_binary_cross_entropy(adjusted, targets)
  return jnp.mean(w_kd * distill + (1.0 - w_kd) * supervised, axis=-1)


# Diagnostics --------------------------------------------------------------------------------------
_COUNT_KEYS = ("samples", "flagged", "corrupted", "flagged_corrupted", "annotated_entries",
               "annotated_correct_before", "annotated_correct_after", "corrupted_entries",
               "corrupted_correct_before", "corrupted_correct_after", "missing_entries",
               "missing_correct_before", "missing_correct_after", "written_entries",
               "written_hard", "annotated_abs_error_before", "annotated_abs_error_after",
               "annotated_positives", "positives_kept_before", "positives_kept_after",
               "missing_positives", "missing_positives_found_after")


def _label_quality_counts(*, before, after, pseudo, noisy, corrupted, clean, annotated):
  """Counts and error sums of one client's refinement, summed over clients for the overall
  figures (see `_label_quality_ratios`)."""
  annotated = np.asarray(annotated, bool)
  missing = ~annotated
  clean_soft = np.asarray(clean, np.float64)
  clean = clean_soft > 0.5
  hit = lambda table: (np.asarray(table) > 0.5) == clean  # noqa: E731  (label rounded at 0.5)
  hit_before, hit_after = hit(before), hit(after)
  annotated_entries = np.broadcast_to(annotated, clean.shape)
  corrupted_entries = np.outer(corrupted, annotated)
  missing_entries = np.broadcast_to(missing, clean.shape)
  written = np.outer(noisy, annotated) | missing_entries
  hard = (pseudo == 0.0) | (pseudo == 1.0)
  return {
      "samples": int(len(noisy)),
      "flagged": int(noisy.sum()),
      "corrupted": int(corrupted.sum()),
      "flagged_corrupted": int((noisy & corrupted).sum()),
      "annotated_entries": int(annotated_entries.sum()),
      "annotated_correct_before": int((hit_before & annotated_entries).sum()),
      "annotated_correct_after": int((hit_after & annotated_entries).sum()),
      "corrupted_entries": int(corrupted_entries.sum()),
      "corrupted_correct_before": int((hit_before & corrupted_entries).sum()),
      "corrupted_correct_after": int((hit_after & corrupted_entries).sum()),
      "missing_entries": int(missing_entries.sum()),
      "missing_correct_before": int((hit_before & missing_entries).sum()),
      "missing_correct_after": int((hit_after & missing_entries).sum()),
      "written_entries": int(written.sum()),
      "written_hard": int((hard & written).sum()),
      # Soft labels can hurt without changing the rounded accuracy: keep the mean |Ŷ − Y| too.
      "annotated_abs_error_before": float(np.abs(before - clean_soft)[annotated_entries].sum()),
      "annotated_abs_error_after": float(np.abs(after - clean_soft)[annotated_entries].sum()),
      # Multi-label tables are mostly negatives, so accuracy hides lost positives: count them.
      "annotated_positives": int((clean & annotated_entries).sum()),
      "positives_kept_before": int(((np.asarray(before) > 0.5) & clean & annotated_entries).sum()),
      "positives_kept_after": int(((np.asarray(after) > 0.5) & clean & annotated_entries).sum()),
      "missing_positives": int((clean & missing_entries).sum()),
      "missing_positives_found_after": int(
          ((np.asarray(after) > 0.5) & clean & missing_entries).sum()),
  }




def _label_quality_ratios(c: dict) -> dict:
  """Detection precision/recall against the corrupted mask; accuracy (label > 0.5 vs the clean
  label) before/after this refinement on all annotated entries, on the annotated entries of
  corrupted samples and on missing-class entries; the share of hard (0/1) pseudo-labels `q` among
  the entries this refinement wrote (noisy samples' annotated entries and every missing entry);
  the mean |Ŷ − Y_clean| on annotated entries before/after (soft labels show up only there); the
  recall of true positives in the table (Ŷ > 0.5 where the clean label is 1) on annotated entries
  before/after and on missing-class entries after (tables are mostly negatives, so accuracy alone
  hides positives the refinement erases). None where a ratio is undefined."""
  hard = common.ratio(c["written_hard"], c["written_entries"])
  return {
      "flagged": c["flagged"],
      "noisy_precision": common.ratio(c["flagged_corrupted"], c["flagged"]),
      "noisy_recall": common.ratio(c["flagged_corrupted"], c["corrupted"]),
      "annotated_label_acc_before": common.ratio(c["annotated_correct_before"],
                                                 c["annotated_entries"]),
      "annotated_label_acc": common.ratio(c["annotated_correct_after"], c["annotated_entries"]),
      "annotated_label_mae_before": common.ratio(c["annotated_abs_error_before"],
                                                 c["annotated_entries"]),
      "annotated_label_mae": common.ratio(c["annotated_abs_error_after"], c["annotated_entries"]),
      "corrupted_label_acc_before": common.ratio(c["corrupted_correct_before"],
                                                 c["corrupted_entries"]),
      "corrupted_label_acc": common.ratio(c["corrupted_correct_after"], c["corrupted_entries"]),
      "missing_label_acc_before": common.ratio(c["missing_correct_before"], c["missing_entries"]),
      "missing_label_acc": common.ratio(c["missing_correct_after"], c["missing_entries"]),
      "positive_label_recall_before": common.ratio(c["positives_kept_before"],
                                                   c["annotated_positives"]),
      "positive_label_recall": common.ratio(c["positives_kept_after"], c["annotated_positives"]),
      "missing_positive_recall": common.ratio(c["missing_positives_found_after"],
                                              c["missing_positives"]),
      "hard_fraction": hard,
      "soft_fraction": None if hard is None else 1.0 - hard,
      **{k: c[k] for k in ("samples", "corrupted", "flagged_corrupted", "written_entries")},
  }


# The method ---------------------------------------------------------------------------------------
class FedNML(Method):
  """FedNML (ALGORITHMS.md §2); see the module docstring for the choices made."""

  name = "fednml"
  supported_tasks = ("multilabel",)  # sigmoid, per-class formulation

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.warmup_rounds = 10  # rounds of masked BCE before refinement and distillation start
    c.refine_every = 5  # refine the label table on rounds warmup_rounds + j·refine_every
    c.hard_high = 0.9  # hybrid pseudo-labels: p > hard_high → 1
    c.hard_low = 0.1  # ... p < hard_low → 0, soft in between
    c.missing_momentum = 0.8  # Ŷ_missing ← (1 − m)·q + m·Ŷ_missing
    c.kd_ceiling = 0.8  # w_kd(t) = ceiling·exp(exponent·(1 − ramp progress)²), ramp warmup → rounds
    c.kd_exponent = -2.0
    c.tau = 1.0  # logit-adjustment temperature: z + tau·log π
    c.reference_label_init = False  # True: start Ŷ before masking (the reference's leak; see docs)
    c.refine_labels = True  # False (ablation): phase 2 trains on the initial table, no GMM refinement
    c.gmm_seed = 0  # GaussianMixture random_state
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = config.fednml
    cfg = self.cfg
    checks = [
        ("warmup_rounds", cfg.warmup_rounds >= 0, "non-negative"),
        ("refine_every", cfg.refine_every >= 1, "at least 1"),
        ("hard_low", 0.0 <= cfg.hard_low <= cfg.hard_high <= 1.0,
         "with hard_high in 0 <= hard_low <= hard_high <= 1"),
        ("missing_momentum", 0.0 <= cfg.missing_momentum <= 1.0, "in [0, 1]"),
        ("kd_ceiling", 0.0 <= cfg.kd_ceiling <= 1.0, "in [0, 1]"),
        ("tau", cfg.tau >= 0.0, "non-negative"),
        ("gmm_seed", cfg.gmm_seed >= 0, "non-negative"),
    ]
    common.check_constants("fednml", cfg, checks)

  # Schedule ------------------------------------------------------------------------------------
  def phase(self, rnd: int) -> str:
    return "warmup" if rnd < self.cfg.warmup_rounds else "refine"

  def uses_teacher(self, phase: str) -> bool:
    return phase == "refine"

  def is_refinement_round(self, rnd: int) -> bool:
    warmup = self.cfg.warmup_rounds
    return rnd >= warmup and (rnd - warmup) % self.cfg.refine_every == 0

  def kd_weight(self, rnd: int) -> float:
    return kd_weight(rnd, warmup=self.cfg.warmup_rounds, end=self.config.rounds,
                     ceiling=self.cfg.kd_ceiling, exponent=self.cfg.kd_exponent)

  def scalars(self, rnd: int, state: dict) -> dict:
    del state
    return {"w_kd": self.kd_weight(rnd)}

  # Host state ----------------------------------------------------------------------------------
  def initial_label_table(self) -> np.ndarray:
    source = self.setup.noisy_labels if self.cfg.reference_label_init else self.setup.observed_labels
    return self.setup.layout.gather(np.asarray(source, np.float32)).astype(np.float32)

  def init_state(self) -> dict:
    table = self.initial_label_table()
    return {"label_table": table, "class_counts": table.sum(axis=1).astype(np.float32),
            "refinements": 0}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    counts = self.setup.layout.counts.astype(np.float32)
    prior = state["class_counts"] / np.maximum(counts, 1.0)[:, None]
    per_sample = {"targets": np.asarray(state["label_table"], np.float32)}
    per_client = {"class_mask": self.setup.annotated.astype(np.float32),
                  "class_prior": prior.astype(np.float32)}
    return per_sample, per_client

  def before_round(self, ctx, state: dict):
    rnd = ctx.round
    if not self.is_refinement_round(rnd) or not self.cfg.refine_labels:
      return state, False, {}
    cfg, layout = self.cfg, self.setup.layout
    first = int(state["refinements"]) == 0
    w_kd = self.kd_weight(rnd)
    probs = np.asarray(ctx.predict_train(), np.float64)  # (K, n_max, C), one device pass
    table = np.array(state["label_table"], np.float32)  # a copy: the old state stays valid
    class_counts = np.array(state["class_counts"], np.float32)
    clean = layout.gather(np.asarray(self.setup.clean_labels, np.float32))
    corrupted = layout.gather(np.asarray(self.setup.corrupted, bool), fill=False)
    clients, degenerate, totals = [], [], dict.fromkeys(_COUNT_KEYS, 0)
    for k in range(layout.num_real_clients):
      rows = layout.valid[k]
      annotated = np.asarray(self.setup.annotated[k], bool)
      p, before = probs[k, rows], table[k, rows].astype(np.float64)
      consistency, loss = consistency_and_loss(p, before, annotated if first else None)
      features = np.stack([consistency, -loss], axis=1)
      noisy, reason, gmm = fit_noise_gmm(features, seed=cfg.gmm_seed)
      if ctx.plots_dir:
        plots.plot_noise_gmm(
            os.path.join(ctx.plots_dir, f"gmm_round{rnd:03d}_client{k}.png"), features,
            corrupted[k, rows], noisy, gmm,
            f"FedNML refinement {int(state['refinements']) + 1}, round {rnd}, client {k}")
      if reason is not None:
        degenerate.append({"client": k, "reason": reason})
        logging.warning("fednml round %d, client %d: %s; no sample flagged noisy.", rnd, k, reason)
      pseudo = hybrid_pseudo_labels(p, cfg.hard_high, cfg.hard_low)
      after = refine_label_table(before, pseudo, noisy, annotated, cfg.missing_momentum)
      table[k, rows] = after
      class_counts[k] = update_class_counts(class_counts[k], after, w_kd)
      counts = _label_quality_counts(before=before, after=after, pseudo=pseudo, noisy=noisy,
                                     corrupted=corrupted[k, rows], clean=clean[k, rows],
                                     annotated=annotated)
      for key in _COUNT_KEYS:
        totals[key] += counts[key]
      clients.append({"client": k, "gmm_skipped": reason, **_label_quality_ratios(counts)})
    new_state = {"label_table": table, "class_counts": class_counts,
                 "refinements": int(state["refinements"]) + 1}
    record = {
        "refinement": new_state["refinements"],
        "w_kd": float(w_kd),
        "features_on": "annotated classes" if first else "all classes",
        "overall": _label_quality_ratios(totals),
        "clients": clients,
        "degenerate": degenerate,
    }
    overall = record["overall"]
    logging.info("fednml round %d refinement %d: %d flagged (precision %s, recall %s), corrupted "
                 "label acc %s → %s, missing label acc %s → %s", rnd, record["refinement"],
                 overall["flagged"], common.fmt(overall["noisy_precision"]),
                 common.fmt(overall["noisy_recall"]),
                 common.fmt(overall["corrupted_label_acc_before"]),
                 common.fmt(overall["corrupted_label_acc"]),
                 common.fmt(overall["missing_label_acc_before"]),
                 common.fmt(overall["missing_label_acc"]))
    return new_state, True, record

  # Device side ---------------------------------------------------------------------------------
  def client_loss(self, phase, *, logits, batch, client, teacher_logits, scalars):
    if phase == "warmup":
      return self.task.supervised_loss(logits, batch["targets"], client["class_mask"])
    return logit_adjusted_kd_loss(logits, batch["targets"], teacher_logits, client["class_prior"],
                                  scalars["w_kd"], tau=self.cfg.tau)


