r"""MaskedOptim and FedELC: noisy clients learn their labels end to end, adapted to partially
annotated multi-label data (ALGORITHMS.md §3), and as published on single-label tasks.

Papers: MaskedOptim = Jiang et al., "Towards Robust Federated Learning against Noisy Labels via
Masked Optimization" (arXiv 2506.02079); FedELC = Jiang, Sun, Li, Xue, Li, Wu, Xu, Wang and Liu,
"Tackling Noisy Clients in Federated Learning with End-to-end Label Correction" (CIKM 2024, arXiv
2408.04301). Both build on FedNoRo (client detection) and PENCIL (Yi and Wu, ICCV 2019: labels as
learnable logits).
Reference code: Sprinter1999/MaskedOptim, `fl_components/update.py` (`LocalUpdateMaskedOptim`:
`pencil_loss`, `label_updating`, `train_stage1`, `train_stage2`), `main_fed_LNL.py` (stages,
detection), `fl_components/fed.py` (`RFA`), `utils/options.py` (constants); Sprinter1999/FedELC,
`fl_models/update.py` (`LocalUpdateFedELC`), `fl_models/fed.py` (`DaAgg`), `utils/options.py`.

Schedule (both methods):
- **warm-up** (`rnd < warmup_rounds`): every client trains with the logit-adjusted loss of its
  local class priors (`fednoro.logit_adjusted_bce`, as the references' `LogitAdjust`).
- **detection** (once, on the host before round `warmup_rounds`): FedNoRo's noisy-client detection
  on the global model's per (client, class) losses (`fednoro.client_class_losses`,
  `fednoro.detect_noisy_clients`: 9 seeded GMM fits and a vote), logged as a `detection` record.
- **correction** (`rnd >= warmup_rounds`): clean clients keep the logit-adjusted loss (the
  references call `train_stage1` for them); noisy clients train the model and their per-sample
  label logits `l` jointly on `label_correction_loss` (`train_stage2`):
  `L = KL(pred ‖ label) + α·L_o + β·H(pred)` (per-class terms, see below), with the label logits
  frozen during a local epoch and moved once at its end by `l ← l − λ·Σ_epoch ∂L/∂l`
  (`label_updating`, λ = `label_lr` = 1000). After the last epoch the labels become
  `label_scale × mean(label distribution, local prediction)` (see below), which the next round
  starts from (the references keep `label_update` in the persistent client object).
- **aggregation.** MaskedOptim: each noisy client returns `0.2·θ_global + 0.8·θ_local` (only noisy
  clients in the correction phase: the merge sits in `train_stage2`), then the server takes the
  per-tensor geometric median (`aggregation.geometric_median`: Weiszfeld from the mean, 10
  iterations, eps 1e-5) with uniform client weights, in every round including the warm-up (the
  reference's `RFA`). FedELC: `config.aggregation` (FedAvg) until detection, then DaAgg with
  sample-count weights and the detected noisy clients (`aggregation.daagg`).

MaskedOptim vs FedELC (the references' `pencil_loss` differ in two places, the aggregation in one):
MaskedOptim computes `L_o` only on the `valid_fraction` (80%) samples of the batch with the lowest
supervised loss (its "valid mask", `torch.topk(ce_loss, int(0.8·B), largest=False)`), merges noisy
clients with the global model (0.2/0.8) and aggregates by geometric median. FedELC computes `L_o`
on every sample, does not merge, and aggregates with DaAgg. Their reference defaults also differ:
warm-up 30 vs 20 rounds (`--epoch_of_stage1`), entropy weight β = 0.1 vs 0.2 (`--beta_pencil`);
both use α = 0.5, λ = 1000, label scale 10. Each method's defaults are its own reference's.

Multi-label adaptations (both references are single-label softmax):
- **Labels as per-class Bernoulli logits.** Each class of each sample has its own label logit
  `l_c`, the label distribution is `σ(l_c)`. A Bernoulli is a two-way softmax over (negative,
  positive) with logit difference `l_c`, which fixes every translation below. The reference starts
  the softmax logits at `label_scale` (10) on the given class and 0 elsewhere; here `l_c` starts at
  +10 where the observed label is 1 and at −10 where it is 0 (two-way logits (0, 10) or (10, 0)).
- **Loss terms** (`label_correction_loss`), with `p_c = σ(z_c)` the model's prediction:
  `KL(pred ‖ label)` is the per-class `KL(Bern(p_c) ‖ Bern(σ(l_c)))`, the entropy the per-class
  `H(Bern(p_c))`, both averaged over the client's annotated classes (the reference's sum over the
  C classes divided by C); the compatibility term `L_o` is the per-class BCE of the label logits
  against the observed labels, averaged over the annotated classes (the reference's
  `−log softmax(l)[y]` of the single class). Missing classes take part in nothing, so their label
  logits never move. As in the reference, gradients of KL and entropy flow into both the model
  and the label logits (`pred` is not detached).
- **Valid mask.** The samples of the batch are ranked by their supervised loss (BCE of the model's
  logits against the observed labels, averaged over the annotated classes: the reference's CE) and
  the `floor(valid_fraction · n)` lowest of the batch's n real samples keep `L_o`; padding samples
  are never ranked. As the reference, the masked-out samples still count in the batch mean.
- **The 10 × mean rule.** The reference sets `l ← K·(softmax(l) + softmax(z_local))/2`. On the
  two-way softmax of a class this gives logits (K·(1 − q), K·q) with `q = (σ(l) + p)/2`, so the
  Bernoulli logit becomes `K·(2q − 1) = K·(σ(l) + p − 1)` (`merged_label_logits`): +K / −K for a
  certain positive / negative, as the initialisation. (Scaling the Bernoulli logit itself by K·q
  would make every label positive.) It applies to the annotated classes of noisy clients only.

Single-label tasks (`config.task = "singlelabel"`) get both methods as published: the warm-up and
clean clients use FedNoRo's softmax `LogitAdjust` (`fednoro.logit_adjusted_ce`); a noisy client's
label logits `l` (n_max, C) start at `label_scale` on the observed class and 0 elsewhere
(`initial_label_logits_single_label`); its loss is the references' `pencil_loss`
(`label_correction_loss_single_label`): `L_c/C + α·L_o + β·L_e/C` with `L_c = KL(softmax(z) ‖
softmax(l))`, `L_e` the prediction's entropy and `L_o = −log softmax(l)[y]`, on the valid mask of
the model's cross-entropy for MaskedOptim and on every sample for FedELC; and the 10 × mean rule is
the references' `l ← K·(softmax(l) + softmax(z_local))/2` (`merged_label_logits_single_label`).
The epoch's label step, the merge, detection and aggregation are those above; the diagnostics
take `argmax l` per sample as the label.

Choices where the references are silent or where this engine differs (each deliberate):
- **Label gradients per sample.** The reference takes the mean loss of a full batch
  (`drop_last=True`), so each sample's label gradient carries a factor 1/B, and the samples of the
  last partial batch get no label step that epoch. The engine keeps partial batches (averaged over
  their real samples); `update_local` rescales each step's label gradients by (real samples)/B so
  that every sample's label step carries 1/B as in a full batch of the reference. Each sample is
  visited once per epoch, so summing the steps' gradients equals the reference's per-epoch
  assignment `labels_grad[idx] = grad`.
- **Local prediction for the 10 × mean rule.** The reference runs the final local model on the
  training transform, still in train mode (BatchNorm batch statistics). Here it is the final local
  model (before the 0.2/0.8 merge, as the reference) in eval mode (running statistics) on the weak
  view (`frame.predict_all`), with a key drawn per client and round.
- **Warm-up 0** is allowed (detection with the untrained model, warned). A run shorter than the
  warm-up never detects; there is no round-based ramp (the references compute a KD weight for
  `train_stage2` but never use it).
- **Degenerate detection** (fewer than 2 clients, constant loss matrix, every GMM failing) flags
  nobody, as `fednoro.detect_noisy_clients`; with no noisy client, the correction phase is the
  logit-adjusted loss everywhere.
- The local optimiser and batch size are the engine's (`config.optim`, `config.fl`); the references
  use SGD (lr 0.01, momentum 0.9), batch 64, 5 local epochs.

Host state (plain numpy, checkpointable): `noisy` (K,) bool, `detected` (0/1) and `label_logits`
(K, n_max, C) float32, the learned label logits of every slot (padding slots and clients stay at
their initial values). Diagnostics: the `detection` record (as FedNoRo's, plus detection precision
and recall against the clients the simulation actually corrupted) and, after every correction
round, a `label_correction` record: on the noisy clients' annotated entries, the accuracy of the
labels `σ(l) > 0.5` against the clean labels (the observed labels, before the round, after the
epochs' gradient steps, after the 10 × mean rule), overall and on corrupted samples; on a
single-label task, the same on the noisy clients' samples with the labels `argmax l`.
"""

from __future__ import annotations

import fractions

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
from fednml_jax.methods.fednoro import (detect_once, detection_client_arrays, logit_adjusted_bce,
                                        logit_adjusted_ce)


# Device side: losses (pure, per sample) -----------------------------------------------------------

def bernoulli_entropy(logits):
  """Per-entry entropy `H(Bern(σ(z)))` from logits (gradient flows into z)."""
  logits = logits.astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(logits, jax.nn.sigmoid(logits))


def bernoulli_kl(logits, label_logits):
  """Per-entry `KL(Bern(σ(z)) ‖ Bern(σ(l)))` = BCE(l, σ(z)) − H(σ(z)); gradients flow into both
  the prediction logits z and the label logits l (the reference's `Lc`, `pred` not detached)."""
  logits = logits.astype(jnp.float32)
  pred = jax.nn.sigmoid(logits)
  return (optax.sigmoid_binary_cross_entropy(label_logits.astype(jnp.float32), pred)
          - optax.sigmoid_binary_cross_entropy(logits, pred))


def lowest_loss_mask(per_sample_loss, weight, keep_fraction: float):
  """(B,) float 0/1: the `floor(keep_fraction · n)` real samples (weight > 0; n of them) with the
  lowest loss; ties go to the earlier batch position. MaskedOptim's valid mask
  (`torch.topk(ce_loss, int(0.8·B), largest=False)`). `keep_fraction` is read as the nearest p/q
  with q ≤ 10 000, so the count is exact integer arithmetic (0.7·10 is 7, not 6)."""
  frac = fractions.Fraction(keep_fraction).limit_denominator(10_000)
  real = weight > 0
  keep = (jnp.sum(real.astype(jnp.int32)) * frac.numerator) // frac.denominator
  ranked = jnp.where(real, jax.lax.stop_gradient(per_sample_loss), jnp.inf)
  order = jnp.argsort(ranked, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
  return ((rank < keep) & real).astype(jnp.float32)


def label_correction_loss(logits, label_logits, targets, class_mask, weight, *,
                          compatibility_weight=0.5, entropy_weight=0.1, valid_fraction=0.8):
  """Per-sample loss (B,) of a noisy client: `KL + α·mask·L_o + β·H`, each term a per-class
  Bernoulli quantity averaged over the annotated classes (`class_mask`).

  `logits` (B, C) are the model's, `label_logits` (B, C) the batch's rows of the learned labels,
  `targets` (B, C) the observed labels, `weight` (B,) the batch weights (0 on padding). `mask` is
  `lowest_loss_mask` of the supervised BCE with `valid_fraction` (1.0: every real sample, FedELC).
  The reference's `Lc/C + α·Lo + β·Le/C` with its `/C` as the class average."""
  kl = masked_class_mean(bernoulli_kl(logits, label_logits), class_mask)
  entropy = masked_class_mean(bernoulli_entropy(logits), class_mask)
  targets = targets.astype(jnp.float32)
  compatibility = masked_class_mean(
      optax.sigmoid_binary_cross_entropy(label_logits.astype(jnp.float32), targets), class_mask)
  supervised = masked_class_mean(
      optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets), class_mask)
  valid = lowest_loss_mask(supervised, weight, valid_fraction)
  return kl + compatibility_weight * valid * compatibility + entropy_weight * entropy


def label_correction_loss_single_label(logits, label_logits, targets, weight, *,
                                       compatibility_weight=0.5, entropy_weight=0.1,
                                       valid_fraction=0.8):
  """Per-sample loss (B,) of a noisy client on a single-label (softmax) task: the reference's
  `pencil_loss` as published, `L_c/C + α·mask·L_o + β·L_e/C` before its batch mean.

  With `p = softmax(z)` the prediction and `softmax(l)` the label distribution: `L_e = −Σ p·log p`
  (the prediction's entropy), `L_c = −Σ p·log softmax(l) − L_e` (`KL(p ‖ softmax(l))`, gradients
  into both z and l), `L_o = −Σ y·log softmax(l)` (`−log softmax(l)[y]` for the one-hot observed
  label `targets`). `mask` is `lowest_loss_mask` of the model's cross-entropy against `targets`
  with `valid_fraction` (1.0: every real sample, FedELC); C is the number of classes."""
  num_classes = logits.shape[-1]
  log_pred = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  pred = jnp.exp(log_pred)
  log_label = jax.nn.log_softmax(label_logits.astype(jnp.float32), axis=-1)
  targets = targets.astype(jnp.float32)
  entropy = -jnp.sum(pred * log_pred, axis=-1)
  kl = -jnp.sum(pred * log_label, axis=-1) - entropy
  compatibility = -jnp.sum(targets * log_label, axis=-1)
  valid = lowest_loss_mask(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets),
                           weight, valid_fraction)
  return (kl / num_classes + compatibility_weight * valid * compatibility
          + entropy_weight * entropy / num_classes)


def initial_label_logits(observed, scale=10.0):
  """`+scale` where the observed label is 1, `−scale` where it is 0 (the reference's `K_pencil` on
  the given class of a two-way softmax)."""
  return (scale * (2.0 * np.asarray(observed, np.float32) - 1.0)).astype(np.float32)


def initial_label_logits_single_label(observed, scale=10.0):
  """`scale` at the observed class (one-hot `observed`), 0 elsewhere (the reference's
  `label_update[i][y_i] = K_pencil`)."""
  return (scale * np.asarray(observed, np.float32)).astype(np.float32)


def merged_label_logits(label_logits, local_logits, scale=10.0):
  """The 10 × mean rule on per-class Bernoulli labels: `scale·(2q − 1)` with
  `q = (σ(l) + σ(z_local)) / 2`, i.e. `scale·(σ(l) + σ(z_local) − 1)`."""
  return scale * (jax.nn.sigmoid(label_logits) + jax.nn.sigmoid(local_logits) - 1.0)


def merged_label_logits_single_label(label_logits, local_logits, scale=10.0):
  """The reference's 10 × mean rule on softmax labels: `scale·(softmax(l) + softmax(z_local))/2`,
  taken as the new label logits."""
  return scale * 0.5 * (jax.nn.softmax(label_logits.astype(jnp.float32), axis=-1)
                        + jax.nn.softmax(local_logits.astype(jnp.float32), axis=-1))


def epoch_label_step(label_logits, grad_sum, label_lr):
  """`l − λ·Σ_epoch ∂L/∂l` (the reference's `label_updating`, once per local epoch)."""
  return label_logits - label_lr * grad_sum


def merge_with_global(client_vars, global_vars, merge, global_weight=0.2):
  """`global_weight·θ_global + (1 − global_weight)·θ_k` for the clients where `merge` (K,) is true
  (MaskedOptim's 0.2/0.8 merge of every tensor, BatchNorm statistics included), `θ_k` elsewhere."""
  merge = jnp.asarray(merge, bool)

  def one(local, glob):
    mixed = (global_weight * glob.astype(jnp.float32)[None]
             + (1.0 - global_weight) * local.astype(jnp.float32)).astype(local.dtype)
    return jnp.where(merge.reshape((-1,) + (1,) * (local.ndim - 1)), mixed, local)

  return jax.tree.map(one, client_vars, global_vars)


# Host side: diagnostics (numpy) -------------------------------------------------------------------
def label_accuracy(label_logits, reference, entries, single_label=False):
  """Fraction of the `entries` (bool mask) where the learned label equals `reference`; None when
  there is no entry. Multi-label: per (sample, class) entry, `σ(l) > 0.5` against `reference`
  (0/1), `entries` of the tables' shape. Single-label: per sample, `argmax l` against
  `argmax reference`, `entries` of the tables' shape without the class axis."""
  entries = np.asarray(entries, bool)
  if not entries.any():
    return None
  if single_label:
    agree = np.argmax(label_logits, axis=-1) == np.argmax(reference, axis=-1)
  else:
    agree = (np.asarray(label_logits) > 0) == (np.asarray(reference) > 0.5)
  return float(agree[entries].mean())


# The methods --------------------------------------------------------------------------------------
class MaskedOptim(Method):
  """MaskedOptim (ALGORITHMS.md §3); see the module docstring for the multi-label adaptation and
  the single-label (published) form. `FedELC` is this class without the valid mask and the
  global merge, aggregated with DaAgg."""

  name = "maskedoptim"
  # Multi-label: per-class Bernoulli labels; single-label: the published softmax labels.
  supported_tasks = ("multilabel", "singlelabel")

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.warmup_rounds = 30  # --epoch_of_stage1: logit-adjusted warm-up; detection before this round
    c.label_lr = 1000.0  # --lamda_pencil: label logits step by −λ·(epoch's gradient sum)
    c.label_scale = 10.0  # --K_pencil: initial ±label logit, and K of the 10 × mean rule
    c.compatibility_weight = 0.5  # --alpha_pencil: weight α of L_o
    c.entropy_weight = 0.1  # --beta_pencil: weight β of the prediction entropy
    c.valid_fraction = 0.8  # L_o on the int(0.8·B) lowest-loss samples of a batch
    c.global_weight = 0.2  # noisy clients return 0.2·θ_global + 0.8·θ_local
    c.tau = 1.0  # logit-adjustment temperature of the LA loss: z + τ·log π
    c.gmm_seeds = 9  # FedNoRo's detection: GaussianMixture random_state = 0..8, majority vote
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = cfg = config[self.name]
    common.check_constants(self.name, cfg, self._config_checks(cfg))
    if cfg.warmup_rounds == 0:
      logging.warning("config.%s.warmup_rounds = 0: noisy clients are detected with the initial "
                      "(untrained) global model.", self.name)
    self.single_label = self.task.name == "singlelabel"
    layout = setup.layout
    self.observed = layout.gather(np.asarray(setup.observed_labels, np.float32))  # (K, n_max, C)
    # π_c per client on its observed labels (the LA loss clamps π and 1 − π at 1e-12).
    self.class_prior = (self.observed.sum(axis=1) / np.maximum(layout.counts, 1)[:, None]).astype(
        np.float32)

  def _config_checks(self, cfg):
    return _shared_config_checks(cfg) + [
        ("valid_fraction", 0.0 <= cfg.valid_fraction <= 1.0, "in [0, 1]"),
        ("global_weight", 0.0 <= cfg.global_weight <= 1.0, "in [0, 1]"),
    ]

  @property
  def valid_fraction(self) -> float:
    return float(self.cfg.valid_fraction)

  # Schedule ------------------------------------------------------------------------------------
  def phase(self, rnd: int) -> str:
    return "warmup" if rnd < self.cfg.warmup_rounds else "correct"

  # Host state ----------------------------------------------------------------------------------
  def init_state(self) -> dict:
    initial = initial_label_logits_single_label if self.single_label else initial_label_logits
    return {"noisy": np.zeros(self.setup.layout.num_clients, bool), "detected": np.int32(0),
            "label_logits": initial(self.observed, self.cfg.label_scale)}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    per_sample, per_client = super().client_arrays(state)
    per_sample = dict(per_sample, label_logits=np.asarray(state["label_logits"], np.float32))
    return per_sample, detection_client_arrays(per_client, self.class_prior, state,
                                               self.setup.layout.num_clients)

  def before_round(self, ctx, state: dict):
    """FedNoRo's noisy-client detection, once, before round `warmup_rounds`."""
    return detect_once(self, ctx, state)

  def after_round(self, rnd: int, state: dict, outputs: dict):
    """Stores the noisy clients' new label logits (real slots of real clients) and logs their
    accuracy against the clean labels."""
    if "label_logits" not in outputs or not np.asarray(state["noisy"]).any():
      return state, False, {}
    layout = self.setup.layout
    rows = np.zeros(layout.valid.shape, bool)
    rows[:layout.num_real_clients] = layout.valid[:layout.num_real_clients]
    before = np.asarray(state["label_logits"])
    after = np.where(rows[..., None], np.asarray(outputs["label_logits"]), before)
    record = self._correction_record(rnd, state["noisy"], before,
                                     np.asarray(outputs["learned_logits"]), after)
    logging.info("%s round %d: label accuracy on noisy clients' %s %s → %s "
                 "(observed %s; corrupted samples %s → %s)", self.name, rnd,
                 "samples" if self.single_label else "annotated entries",
                 common.fmt(record["accuracy"]["before"]), common.fmt(record["accuracy"]["after"]),
                 common.fmt(record["accuracy"]["observed"]),
                 common.fmt(record["accuracy_corrupted"]["before"]),
                 common.fmt(record["accuracy_corrupted"]["after"]))
    return dict(state, label_logits=after.astype(np.float32)), True, {"label_correction": record}

  def _correction_record(self, rnd, noisy, before, learned, after) -> dict:
    """The `label_correction` record. Its entries are the noisy clients' (sample, annotated
    class) pairs for a multi-label task, their samples for a single-label one (label = arg max)."""
    setup, layout = self.setup, self.setup.layout
    clean = layout.gather(np.asarray(setup.clean_labels, np.float32))
    corrupted = layout.gather(np.asarray(setup.corrupted, bool), fill=False)
    noisy = np.asarray(noisy, bool)
    single = self.single_label
    if single:
      entries = noisy[:, None] & layout.valid
      on_corrupted = entries & corrupted
      observed_logits = self.observed  # arg max = the observed class
      changed = (np.argmax(after, axis=-1) != np.argmax(self.observed, axis=-1))[entries]
    else:
      annotated = np.asarray(setup.annotated, bool)
      entries = (noisy[:, None, None] & layout.valid[:, :, None] & annotated[:, None, :])
      on_corrupted = entries & corrupted[:, :, None]
      observed_logits = self.observed * 2.0 - 1.0
      changed = ((after > 0) != (self.observed > 0.5))[entries]
    tables = {"observed": observed_logits, "before": before, "learned": learned, "after": after}

    def accuracies(mask):
      return {name: label_accuracy(table, clean, mask, single) for name, table in tables.items()}

    # Multi-label: how many entries each table labels positive, and which share of the clean
    # positives it keeps (label correction can erase rare positives wholesale).
    positives = (None if single else
                 {name: int(((table > 0) & entries).sum()) for name, table in tables.items()})
    return {
        "round": rnd,
        "noisy_clients": np.flatnonzero(noisy).tolist(),
        "entries": int(entries.sum()),
        "corrupted_entries": int(on_corrupted.sum()),
        "accuracy": accuracies(entries),
        "accuracy_corrupted": accuracies(on_corrupted),
        "clean_positives": None if single else int((entries & (clean > 0.5)).sum()),
        "positives": positives,
        "positive_recall": None if single else accuracies(entries & (clean > 0.5)),
        "changed_from_observed": float(changed.mean()) if changed.size else None,
        "clients": [{"client": int(k),
                     "accuracy_before": label_accuracy(before[k], clean[k], entries[k], single),
                     "accuracy_after": label_accuracy(after[k], clean[k], entries[k], single),
                     "accuracy_corrupted_after": label_accuracy(after[k], clean[k],
                                                                on_corrupted[k], single)}
                    for k in np.flatnonzero(noisy)],
    }

  # Device side ---------------------------------------------------------------------------------
  def local_loss(self, phase, ctx):
    """The logit-adjusted loss (BCE, or softmax cross-entropy for a single-label task) in the
    warm-up and for clean clients; the label-correction loss of the task for noisy clients."""
    logits, _ = ctx.student(ctx.view("weak"))
    batch, client = ctx.batch, ctx.frame.client
    if self.single_label:
      la = logit_adjusted_ce(logits, batch["targets"], client["class_prior"], tau=self.cfg.tau)
    else:
      la = logit_adjusted_bce(logits, batch["targets"], client["class_prior"],
                              client["class_mask"], tau=self.cfg.tau)
    if phase == "warmup":
      return la, {}
    weights = {"compatibility_weight": self.cfg.compatibility_weight,
               "entropy_weight": self.cfg.entropy_weight, "valid_fraction": self.valid_fraction}
    label_logits = ctx.local["trainable"][ctx.slot]
    if self.single_label:
      correction = label_correction_loss_single_label(logits, label_logits, batch["targets"],
                                                      ctx.weight, **weights)
    else:
      correction = label_correction_loss(logits, label_logits, batch["targets"],
                                         client["class_mask"], ctx.weight, **weights)
    return jnp.where(client["noisy"] > 0, correction, la), {}

  def init_local(self, phase, frame, key):
    if phase == "warmup":
      return {}
    label_logits = frame.per_sample["label_logits"]
    return {"trainable": label_logits, "grad_sum": jnp.zeros_like(label_logits)}

  def update_local(self, phase, local, *, frame, grads, aux, slot, weight, active, epoch_end,
                   params, batch_stats):
    """Sums each step's label gradients (scaled to a full batch's 1/B) and moves the label logits
    by −λ·sum at each epoch's end."""
    del aux, slot, active, params, batch_stats
    if phase == "warmup":
      return local
    full_batch = jnp.sum(weight) / frame.batch_size
    grad_sum = local["grad_sum"] + full_batch * grads
    stepped = epoch_label_step(local["trainable"], grad_sum, self.cfg.label_lr)
    return dict(local, trainable=jnp.where(epoch_end, stepped, local["trainable"]),
                grad_sum=jnp.where(epoch_end, jnp.zeros_like(grad_sum), grad_sum))

  def local_output(self, phase, local, *, frame, variables, key):
    """`label_logits`: the task's 10 × mean rule on a noisy client's annotated classes (every
    class for a single-label task; unchanged elsewhere); `learned_logits`: the label logits after
    the epochs' steps, for diagnostics."""
    if phase == "warmup":
      return {}
    learned = local["trainable"]
    local_logits, _ = frame.predict_all(variables, "weak", key)
    merge = merged_label_logits_single_label if self.single_label else merged_label_logits
    merged = merge(learned, local_logits, self.cfg.label_scale)
    rule = (frame.client["noisy"] > 0) & (frame.client["class_mask"] > 0)
    return {"label_logits": jnp.where(rule, merged, learned), "learned_logits": learned}

  def aggregate(self, client_vars, clients, global_vars):
    """Noisy clients merged with the global model (0.2/0.8), then the per-tensor geometric median
    with uniform weights (the reference's `RFA`), in every round."""
    per_client = clients["per_client"]
    merged = merge_with_global(client_vars, global_vars, per_client["noisy"] > 0,
                               self.cfg.global_weight)
    weights = aggregation.client_weights(clients["count"], "uniform")
    return aggregation.geometric_median(merged, weights)


class FedELC(MaskedOptim):
  """FedELC (ALGORITHMS.md §3): MaskedOptim without the valid mask (`L_o` on every sample) and
  without the 0.2/0.8 merge; `config.aggregation` until detection, DaAgg afterwards."""

  name = "fedelc"

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.warmup_rounds = 20  # --epoch_of_stage1 (FedELC's default)
    c.label_lr = 1000.0  # --lamda_pencil
    c.label_scale = 10.0  # --K_pencil
    c.compatibility_weight = 0.5  # --alpha_pencil
    c.entropy_weight = 0.2  # --beta_pencil (FedELC's default; MaskedOptim's is 0.1)
    c.tau = 1.0  # logit-adjustment temperature
    c.gmm_seeds = 9  # detection: GaussianMixture random_state = 0..8, majority vote
    return c

  def _config_checks(self, cfg):
    return _shared_config_checks(cfg)  # no valid_fraction, no global_weight

  @property
  def valid_fraction(self) -> float:
    return 1.0  # no valid mask: L_o on every real sample

  def aggregate(self, client_vars, clients, global_vars):
    """`config.aggregation` until detection, DaAgg (sample-count weights, the detected noisy
    clients) afterwards (the reference's `FedAvg` / `DaAgg`); chosen by the traced `detected`
    flag, so only one branch runs."""
    per_client = clients["per_client"]

    def robust():
      weights = aggregation.client_weights(clients["count"], "sample_count")
      return aggregation.daagg(client_vars, weights, per_client["noisy"] > 0)

    def configured():
      return Method.aggregate(self, client_vars, clients, global_vars)

    return jax.lax.cond(jnp.max(per_client["detected"]) > 0, robust, configured)


def _shared_config_checks(cfg):
  """(key, ok, what it must be) for the constants both methods have."""
  return [
      ("warmup_rounds", common.is_int(cfg.warmup_rounds) and cfg.warmup_rounds >= 0,
       "a non-negative integer"),
      ("label_lr", np.isfinite(cfg.label_lr) and cfg.label_lr >= 0.0, "finite and ≥ 0"),
      ("label_scale", np.isfinite(cfg.label_scale) and cfg.label_scale > 0.0, "positive"),
      ("compatibility_weight",
       np.isfinite(cfg.compatibility_weight) and cfg.compatibility_weight >= 0.0,
       "finite and ≥ 0"),
      ("entropy_weight", np.isfinite(cfg.entropy_weight), "finite"),
      ("tau", np.isfinite(cfg.tau) and cfg.tau >= 0.0, "non-negative"),
      ("gmm_seeds", common.is_int(cfg.gmm_seeds) and cfg.gmm_seeds >= 1, "a positive integer"),
  ]
