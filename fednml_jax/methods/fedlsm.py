r"""FedLSM (Deng, Luo and Chen, "Scale Federated Learning for Label Set Mismatch in Medical Image
Classification", MICCAI 2023), on partially annotated multi-label data with noisy labels
(ALGORITHMS.md §3).

Reference: dzp2095/FedLSM, `src/modules/cxr_trainer.py` (`run_step`: pseudo-labels, mixup, loss),
`src/datasets/data_pool_cxr.py` (`_get_data_idx`: the entropy pools), `src/model/ema.py` and
`src/modules/hooks.py::EMA` (the teacher), `src/fl/server.py::aggregate` and `src/fl/client.py`
(class-wise classifier aggregation), `configs/cxr/run_conf.yaml` (the constants: the ChestX-ray14
multi-label setting).

One phase, every round (the reference has no warm-up):
- **Pools** (host, `before_round`): the received global model's probabilities `p` on every
  client's samples → per-sample entropy on the missing classes `mean_c entr(p_c·[c missing])` with
  `entr(x) = −x·ln x` (the reference's `torch.special.entr`, not the Bernoulli entropy; the mean
  runs over all C classes, annotated ones contributing 0) → the `uncertain_fraction` of the client's
  samples with the highest entropy form the uncertain pool, the `confident_fraction` with the lowest
  the confident pool (`entropy_pools`). The uncertain samples leave the main loss (the reference's
  `pseudo_indices = all − uncertain`).
- **Local training** (every step): the EMA teacher (initialised from the received global model,
  eval mode) labels the batch's weak view; on the client's missing classes `p ≥ 0.85 → 1`,
  `p ≤ 0.01 → 0`, otherwise `p` with weight 0 (`pseudo_labels`, `fill_missing_classes`); the
  annotated classes keep the observed labels with weight 1. The student is trained on the strong
  view with the entry-weighted BCE, plus `mixup_weight`·(mixup loss): `mixup_pairs` uncertain and
  as many confident samples (plain view, as the reference's `OriginialSubset`) are labelled by the
  teacher (uncertain: thresholds 0.7 / 0.005, confident: 0.85 / 0.01, annotated classes keep the
  observed labels), mixed with one `λ ~ Beta(0.2, 0.2)` per step (images and labels), and the BCE
  of the student on the mixed images is weighted by 1 where both partners' teacher outputs are
  confident, 0 elsewhere — on every class, as the reference's `u_c_mask`. The strong view and the
  mixed images go through the student in one forward pass (one set of BatchNorm batch statistics),
  as in the reference. After each optimizer step the teacher's parameters become
  `0.999·teacher + 0.001·student` and its BatchNorm statistics the student's (`ModelEMA.update`).
- **Aggregation**: the head `params["head"]` (kernel (D, C), bias (C,)) per class c with weights
  `n_kc / Σ_k n_kc` (`classwise_head_mean`), `n_kc` = client k's positives of class c among the
  samples of its main loss: observed positives on annotated classes plus pseudo-positives
  (`p ≥ 0.85`) on missing ones (the reference's `_class_nums`); the rest of the model by
  `config.aggregation` with `fl.client_weighting` (default: sample-count weighted mean, the
  reference's `weights_ratio`).

Multi-label, partial-annotation adaptations and choices where the reference is silent or differs:
- **Teacher lifetime.** The reference creates the EMA teacher in `before_train`, i.e. from the
  received global model at the start of every round (`Client.train` → `trainer.train` →
  `EMA.before_train`); so does `init_local`. A step whose batch is all padding (a client with fewer
  samples than the largest one) leaves the teacher as it is.
- **Entry weights.** The reference computes `(binary_cross_entropy_with_logits(z, y) * w).mean()`
  with the default `reduction='mean'`, so its per-entry weights never act per entry: its loss is
  (mean BCE over all entries, unconfident soft targets included) × (mean weight), the weight being
  `pos_weight_c` (global negatives/positives of class c) × the confidence mask. We follow the
  method as ALGORITHMS.md states it: each entry's BCE is multiplied by its 0/1 weight, then averaged
  over the C classes and the batch (the reference's mean over B·C entries), with no class weight
  (in the reference `pos_weight` only ever scales the loss as a whole). `reference_reduction = True`
  reproduces the reference's reduction, with its global `pos_weight` (0 for a class without
  positives, as its `compute_pos_weight`), for comparisons.
- **Mixup partners.** The reference draws them from two extra loaders (4 images each per step,
  infinite shuffled streams over the pools). Here each step draws `mixup_pairs` uncertain and
  `mixup_pairs` confident slots of the client with replacement (`jax.random.choice` weighted by the
  pool flags), so one compiled program serves every client; uncertain sample i is mixed with
  confident sample i. A client with an empty pool (fewer than 2 samples) has no mixup term.
- **Batches.** The main batch is the engine's (`fl.batch_size`, every sample once per local epoch;
  uncertain samples weigh 0 and the batch mean runs over the others) instead of the reference's
  `batch_size − 4` images per step for `local_iter` steps.
- **Ranking pass.** The pools and the host-side positive counts use `ctx.predict_train()`: the
  global model in eval mode on the weak view. The reference ranks with the unaugmented images and
  the model in whatever mode the previous round left it (training mode, so BatchNorm uses batch
  statistics).
- **Pool sizes.** The reference keeps 500 uncertain and 2000 confident samples of clients with
  ≈9,460 ChestX-ray14 images (75,708 training images over 8 clients): 5.3% and 21%. Fractions
  (0.05, 0.2) keep that proportion on datasets of any size; each pool has at least one sample
  (clients with ≥ 2 samples) and at least one sample stays out of the uncertain pool. The confident
  pool is taken among the samples outside the uncertain pool (the same as the reference's two
  `topk`s whenever the entropies differ).
- **Positive counts.** The reference counts positives in the batches each client trained on this
  round, with its evolving EMA teacher, and sends them with the model. `aggregate` only sees arrays
  placed before the round, so the counts are computed on the host from the global model's
  probabilities (the teacher at the start of the round; with decay 0.999 it moves by ≈3% over 30
  steps) over the client's main-loss samples; the reference's fixed `local_iter` steps per client
  make its counts proportional to positive *rates*, ours (every sample once per epoch) to positive
  counts. A class with no positive on any client takes the body's client weights. The counts seen
  during training (teacher pseudo-positives) are logged after the round for comparison.
- The reference's pseudo-label temperature is 1 and is left out; its weak view (a horizontal flip
  only) is the engine's weak view (affine + flip); local optimiser, learning rate and batch size are
  the engine's (`config.optim`, `config.fl`).

Host state (plain numpy, checkpointable): `uncertain`, `confident` (K, n_max) bool pool flags and
`class_positives` (K, C) float32, recomputed every round.

Diagnostics (the `before_round` record, metrics.jsonl): pool sizes, their mean entropies and
corrupted samples; coverage and accuracy against `setup.clean_labels` of the global model's
pseudo-labels on the missing entries of the main-loss samples, the precision and recall of its
pseudo-positives, per client and overall; and, from `after_round` (the clients' `local_output`),
`teacher_training`: what the EMA teachers pseudo-labelled during the round's local training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fednml_jax import aggregation
from fednml_jax.methods import common
from fednml_jax.methods.base import Method


# What the clients count during local training (`local_output`), kept in the host state.
_TRAINING_KEYS = ("confident_missing", "missing_entries", "pseudo_positives", "observed_positives")


# Device side: pure pieces -------------------------------------------------------------------------
def pseudo_labels(probs, high=0.85, low=0.01):
  """`(targets, confident)`: `p ≥ high → 1`, `p ≤ low → 0`, otherwise `p` (soft), and the mask of
  the entries that were set to 0 or 1 (both thresholds inclusive, as the reference's `ge`/`le`)."""
  probs = jnp.asarray(probs, jnp.float32)
  positive, negative = probs >= high, probs <= low
  targets = jnp.where(positive, 1.0, jnp.where(negative, 0.0, probs))
  return targets, positive | negative


def fill_missing_classes(observed, pseudo, confident, class_mask):
  """`(targets, entry_weights)`: the observed labels with weight 1 on the annotated classes
  (`class_mask` 1), the pseudo-labels with weight 1 if confident, else 0, on the missing ones."""
  annotated = jnp.asarray(class_mask) > 0
  targets = jnp.where(annotated, jnp.asarray(observed, jnp.float32), pseudo)
  weights = jnp.where(annotated, 1.0, jnp.asarray(confident, jnp.float32))
  return targets, weights


def weighted_bce(logits, targets, entry_weights):
  """`mean_c w_c·BCE-with-logits(z_c, y_c)` per sample, shape (B,); the mean runs over all C
  classes (entries of weight 0 count in the denominator, as the reference's `.mean()`)."""
  per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                 targets.astype(jnp.float32))
  return jnp.mean(per_entry * entry_weights, axis=-1)


def reference_reduction_bce(logits, targets, entry_weights, sample_weights):
  """The reference's `(BCEWithLogits(z, y, reduction='mean') * w).mean()` as per-sample values
  whose `sample_weights`-weighted batch mean equals it: `mean_c BCE_c · W̄`, with `W̄` the
  weighted batch mean of `mean_c w_c`. Unconfident entries train towards their soft targets."""
  per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                 targets.astype(jnp.float32))
  sample_weights = jnp.asarray(sample_weights, jnp.float32)
  mean_weight = (jnp.sum(sample_weights * jnp.mean(entry_weights, axis=-1))
                 / jnp.maximum(jnp.sum(sample_weights), 1.0))
  return jnp.mean(per_entry, axis=-1) * mean_weight


def mixup(lam, first, second):
  """`λ·first + (1 − λ)·second` (images or labels; the reference's `_mixup`)."""
  return lam * first + (1.0 - lam) * second


def combine_losses(main, keep, sample_weights, mixup_loss, mixup_weight):
  """Per-sample losses whose `sample_weights`-weighted batch mean (the engine's reduction) is
  `mean over kept samples of main + mixup_weight·mixup_loss`: the uncertain samples (`keep` 0)
  leave the main term, whose mean then runs over the others; `mixup_loss` is one number per step."""
  sample_weights = jnp.asarray(sample_weights, jnp.float32)
  kept = sample_weights * keep
  rescale = jnp.sum(sample_weights) / jnp.maximum(jnp.sum(kept), 1e-12)
  return main * keep * jnp.where(jnp.sum(kept) > 0, rescale, 0.0) + mixup_weight * mixup_loss


def ema_update(teacher, student, decay):
  """`decay·teacher + (1 − decay)·student`, leaf by leaf (`ModelEMA.update` on parameters)."""
  return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, student)


def draw_from_pool(key, pool, num):
  """`num` slot indices drawn with replacement, uniformly among the slots where `pool` is 1."""
  pool = jnp.asarray(pool, jnp.float32)
  total = jnp.sum(pool)
  p = jnp.where(total > 0, pool / jnp.maximum(total, 1.0), 1.0 / pool.shape[0])
  return jax.random.choice(key, pool.shape[0], (num,), replace=True, p=p)


def classwise_head_mean(kernels, biases, class_positives, fallback_weights):
  """The head aggregated class by class: column c of the kernels (K, D, C) and entry c of the
  biases (K, C) weighted by `n_kc / Σ_k n_kc` (`class_positives` (K, C)); a class with no positive
  on any client takes `fallback_weights` (K,) (normalised). Returns (kernel (D, C), bias (C,))."""
  positives = jnp.asarray(class_positives, jnp.float32)
  fallback = jnp.asarray(fallback_weights, jnp.float32)
  fallback = fallback / jnp.sum(fallback)
  totals = jnp.sum(positives, axis=0)
  ratio = jnp.where(totals > 0, positives / jnp.where(totals > 0, totals, 1.0), fallback[:, None])
  kernel = jnp.sum(ratio[:, None, :] * kernels.astype(jnp.float32), axis=0)
  bias = jnp.sum(ratio * biases.astype(jnp.float32), axis=0)
  return kernel.astype(kernels.dtype), bias.astype(biases.dtype)


# Host side: pools and counts (numpy) --------------------------------------------------------------
def missing_class_entropy(probs, annotated):
  """Per-sample `mean_c entr(p_c·[c missing])`, `entr(x) = −x·ln x` (0 at 0), over all C classes
  (the reference's ranking score); `probs` (n, C), `annotated` (C,) bool. Shape (n,)."""
  x = np.asarray(probs, np.float64) * ~np.asarray(annotated, bool)
  with np.errstate(divide="ignore", invalid="ignore"):
    entr = np.where(x > 0, -x * np.log(x), 0.0)
  return entr.mean(axis=1)


def pool_sizes(count: int, uncertain_fraction: float, confident_fraction: float):
  """(uncertain, confident) pool sizes of a client with `count` samples: `round(fraction·count)`,
  at least 1 each (for `count` ≥ 2), at most `count − 1` uncertain and the rest confident."""
  if count < 2:
    return 0, 0
  uncertain = min(max(1, int(round(uncertain_fraction * count))), count - 1)
  confident = min(max(1, int(round(confident_fraction * count))), count - uncertain)
  return uncertain, confident


def entropy_pools(entropy, num_uncertain: int, num_confident: int):
  """(uncertain, confident) bool masks (n,): the `num_uncertain` highest entropies, then the
  `num_confident` lowest among the others (ties: the lower index first)."""
  entropy = np.asarray(entropy, np.float64)
  uncertain = np.zeros(entropy.shape[0], bool)
  uncertain[np.argsort(-entropy, kind="stable")[:num_uncertain]] = True
  order = np.argsort(entropy, kind="stable")
  confident = np.zeros_like(uncertain)
  confident[order[~uncertain[order]][:num_confident]] = True
  return uncertain, confident


def global_pos_weight(labels):
  """The reference's `estimate_global_pos_weight`: negatives/positives per class over all clients'
  observed labels (N, C); 0 for a class without positives (its `compute_pos_weight`)."""
  labels = np.asarray(labels, np.float64)
  positives = (labels == 1).sum(axis=0)
  negatives = (labels == 0).sum(axis=0)
  return np.where(positives > 0, negatives / np.maximum(positives, 1), 0.0).astype(np.float32)






# The method ---------------------------------------------------------------------------------------
class FedLSM(Method):
  """FedLSM (ALGORITHMS.md §3); see the module docstring for the adaptations."""

  name = "fedlsm"
  supported_tasks = ("multilabel",)  # sigmoid, per-class pseudo-labels

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.ema_decay = 0.999  # teacher ← decay·teacher + (1 − decay)·student after every local step
    c.pseudo_high = 0.85  # teacher p ≥ this → pseudo-positive (the reference's pseudo_thresh)
    c.pseudo_low = 0.01  # p ≤ this → pseudo-negative (pseudo_negative_thresh); weight 0 between
    c.uncertain_high = 0.7  # mixup: an uncertain sample's confident entries (data_pool.pos_thresh)
    c.uncertain_low = 0.005  # (data_pool.neg_thresh)
    c.uncertain_fraction = 0.05  # uncertain pool: 500 of ≈9,460 samples per client (reference)
    c.confident_fraction = 0.2  # confident pool: 2000 of ≈9,460
    c.mixup_alpha = 0.2  # λ ~ Beta(alpha, alpha), one per step
    c.mixup_weight = 0.1  # loss = main + mixup_weight·mixup (lambda_uncertain)
    c.mixup_pairs = 4  # uncertain/confident pairs per step (data_pool.batch_size)
    c.reference_reduction = False  # True: the reference's mean(BCE)·mean(weight) (see docstring)
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = cfg = config.fedlsm
    checks = [
        ("ema_decay", 0.0 <= cfg.ema_decay <= 1.0, "in [0, 1]"),
        ("pseudo_low", 0.0 <= cfg.pseudo_low < cfg.pseudo_high <= 1.0,
         "with pseudo_high in 0 <= pseudo_low < pseudo_high <= 1"),
        ("uncertain_low", 0.0 <= cfg.uncertain_low < cfg.uncertain_high <= 1.0,
         "with uncertain_high in 0 <= uncertain_low < uncertain_high <= 1"),
        ("uncertain_fraction", 0.0 < cfg.uncertain_fraction < 1.0, "in (0, 1)"),
        ("confident_fraction", 0.0 < cfg.confident_fraction <= 1.0, "in (0, 1]"),
        ("mixup_alpha", cfg.mixup_alpha > 0.0, "positive"),
        ("mixup_weight", cfg.mixup_weight >= 0.0, "non-negative"),
        ("mixup_pairs", isinstance(cfg.mixup_pairs, int) and cfg.mixup_pairs >= 1,
         "a positive integer"),
        ("reference_reduction", isinstance(cfg.reference_reduction, bool), "True or False"),
    ]
    common.check_constants("fedlsm", cfg, checks)
    layout = setup.layout
    self.observed = layout.gather(np.asarray(setup.observed_labels, np.float32))
    real = layout.sample_index[layout.valid]
    self.pos_weight = global_pos_weight(np.asarray(setup.observed_labels)[real])

  # Host state ----------------------------------------------------------------------------------
  def init_state(self) -> dict:
    layout = self.setup.layout
    shape = (layout.num_clients, layout.slots)
    num_classes = self.setup.num_classes
    return {"uncertain": np.zeros(shape, bool), "confident": np.zeros(shape, bool),
            "class_positives": np.zeros((layout.num_clients, num_classes), np.float32)}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    per_sample, per_client = super().client_arrays(state)
    num_clients = self.setup.layout.num_clients
    per_sample = dict(per_sample, uncertain=np.asarray(state["uncertain"], np.float32),
                      confident=np.asarray(state["confident"], np.float32))
    per_client = dict(per_client,
                      class_positives=np.asarray(state["class_positives"], np.float32),
                      pos_weight=np.tile(self.pos_weight, (num_clients, 1)))
    return per_sample, per_client

  def before_round(self, ctx, state: dict):
    """Ranks every client's samples into the pools and counts its positives, with the received
    global model; logs the pools and the quality of its pseudo-labels on missing entries."""
    cfg, setup, layout = self.cfg, self.setup, self.setup.layout
    probs = np.asarray(ctx.predict_train(), np.float64)  # (K, n_max, C), weak view, eval mode
    clean = layout.gather(np.asarray(setup.clean_labels, np.float32)) > 0.5
    corrupted = layout.gather(np.asarray(setup.corrupted, bool), fill=False)
    new_state = dict(state, uncertain=np.zeros_like(state["uncertain"]),
                     confident=np.zeros_like(state["confident"]),
                     class_positives=np.zeros_like(state["class_positives"]))
    clients, totals = [], dict.fromkeys(
        ("missing_entries", "confident", "correct", "pseudo_positives", "true_pseudo_positives",
         "missing_positives"), 0)
    for k in range(layout.num_real_clients):
      rows = layout.valid[k]
      annotated = np.asarray(setup.annotated[k], bool)
      p = probs[k, rows]
      entropy = missing_class_entropy(p, annotated)
      sizes = pool_sizes(int(layout.counts[k]), cfg.uncertain_fraction, cfg.confident_fraction)
      uncertain, confident = entropy_pools(entropy, *sizes)
      new_state["uncertain"][k, rows] = uncertain
      new_state["confident"][k, rows] = confident
      # Counts and diagnostics over the main loss's samples (outside the uncertain pool).
      main = ~uncertain
      pseudo, sure = (np.asarray(a) for a in pseudo_labels(p, cfg.pseudo_high, cfg.pseudo_low))
      missing = main[:, None] & ~annotated[None, :]
      pseudo_positive = missing & sure & (pseudo == 1.0)
      observed_positive = main[:, None] & annotated[None, :] & (self.observed[k, rows] == 1.0)
      new_state["class_positives"][k] = (observed_positive | pseudo_positive).sum(axis=0)
      truth = clean[k, rows]
      counts = {
          "missing_entries": int(missing.sum()),
          "confident": int((missing & sure).sum()),
          "correct": int((missing & sure & ((pseudo > 0.5) == truth)).sum()),
          "pseudo_positives": int(pseudo_positive.sum()),
          "true_pseudo_positives": int((pseudo_positive & truth).sum()),
          "missing_positives": int((missing & truth).sum()),
      }
      for key, value in counts.items():
        totals[key] += value
      clients.append({
          "client": k, "uncertain_pool": sizes[0], "confident_pool": sizes[1],
          "uncertain_mean_entropy": float(entropy[uncertain].mean()) if sizes[0] else None,
          "confident_mean_entropy": float(entropy[confident].mean()) if sizes[1] else None,
          "uncertain_corrupted": int(corrupted[k, rows][uncertain].sum()),
          "confident_corrupted": int(corrupted[k, rows][confident].sum()),
          "class_positives": new_state["class_positives"][k].tolist(),
          **self._pseudo_ratios(counts)})
    record = {"pseudo_labels": self._pseudo_ratios(totals), "clients": clients}
    overall = record["pseudo_labels"]
    logging.info("fedlsm round %d: global-model pseudo-labels cover %s of missing entries "
                 "(accuracy %s, positive precision %s, recall %s); pools %s", ctx.round,
                 common.fmt(overall["coverage"]), common.fmt(overall["accuracy"]),
                 common.fmt(overall["positive_precision"]), common.fmt(overall["positive_recall"]),
                 [(c["uncertain_pool"], c["confident_pool"]) for c in clients])
    return new_state, True, record

  @staticmethod
  def _pseudo_ratios(c: dict) -> dict:
    """Coverage (confident share of the missing entries), accuracy of the confident pseudo-labels
    against the clean labels, precision of the pseudo-positives and the share of the missing
    entries' true positives they find; None where undefined."""
    return {"missing_entries": c["missing_entries"], "pseudo_positives": c["pseudo_positives"],
            "coverage": common.ratio(c["confident"], c["missing_entries"]),
            "accuracy": common.ratio(c["correct"], c["confident"]),
            "positive_precision": common.ratio(c["true_pseudo_positives"], c["pseudo_positives"]),
            "positive_recall": common.ratio(c["true_pseudo_positives"], c["missing_positives"])}

  def after_round(self, rnd: int, state: dict, outputs: dict):
    """Logs what the clients' EMA teachers pseudo-labelled during round `rnd` (`teacher_training`:
    coverage of the missing entries, pseudo-positives and observed positives per class)."""
    num_real = self.setup.layout.num_real_clients
    seen = {key: np.asarray(outputs[key], np.float64)[:num_real] for key in _TRAINING_KEYS}
    coverage = common.ratio(seen["confident_missing"].sum(), seen["missing_entries"].sum())
    clients = [{"client": k,
                "coverage": common.ratio(seen["confident_missing"][k], seen["missing_entries"][k]),
                "pseudo_positives": seen["pseudo_positives"][k].tolist(),
                "observed_positives": seen["observed_positives"][k].tolist()}
               for k in range(num_real)]
    logging.info("fedlsm round %d: EMA teachers' pseudo-labels covered %s of the missing entries "
                 "seen in training", rnd, common.fmt(coverage))
    return state, False, {"teacher_training": {"coverage": coverage, "clients": clients}}

  # Device side ---------------------------------------------------------------------------------
  def init_local(self, phase, frame, key) -> dict:
    del phase, key
    num_classes = frame.per_sample["targets"].shape[-1]
    zeros = jnp.zeros((), jnp.float32)
    return {"teacher": {"params": frame.global_vars["params"],
                        "batch_stats": frame.global_vars["batch_stats"]},
            "seen": {"confident_missing": zeros, "missing_entries": zeros,
                     "pseudo_positives": jnp.zeros((num_classes,), jnp.float32),
                     "observed_positives": jnp.zeros((num_classes,), jnp.float32)}}

  def local_loss(self, phase, ctx):
    del phase
    cfg, frame = self.cfg, ctx.frame
    key_weak, key_strong, key_uncertain, key_confident, key_lam = jax.random.split(ctx.key, 5)
    class_mask = frame.client["class_mask"]
    index = frame.per_sample["image_index"]
    pairs = cfg.mixup_pairs
    uncertain_slots = draw_from_pool(key_uncertain, frame.per_sample["uncertain"], pairs)
    confident_slots = draw_from_pool(key_confident, frame.per_sample["confident"], pairs)
    uncertain_x = frame.views.plain(frame.images[index[uncertain_slots]])
    confident_x = frame.views.plain(frame.images[index[confident_slots]])
    weak = ctx.view("weak", key_weak)
    batch_size = weak.shape[0]
    teacher_logits, _ = frame.apply(ctx.local["teacher"],
                                    jnp.concatenate([weak, uncertain_x, confident_x]))
    teacher_probs = jax.nn.sigmoid(teacher_logits)

    # Main term: observed labels on annotated classes, confident pseudo-labels on missing ones.
    pseudo, confident = pseudo_labels(teacher_probs[:batch_size], cfg.pseudo_high, cfg.pseudo_low)
    targets, entry_weights = fill_missing_classes(ctx.batch["targets"], pseudo, confident,
                                                  class_mask)
    # Mixup term: entries confident for both partners, labels filled on missing classes.
    u_pseudo, u_sure = pseudo_labels(teacher_probs[batch_size:batch_size + pairs],
                                     cfg.uncertain_high, cfg.uncertain_low)
    c_pseudo, c_sure = pseudo_labels(teacher_probs[batch_size + pairs:], cfg.pseudo_high,
                                     cfg.pseudo_low)
    u_targets, _ = fill_missing_classes(frame.per_sample["targets"][uncertain_slots], u_pseudo,
                                        u_sure, class_mask)
    c_targets, _ = fill_missing_classes(frame.per_sample["targets"][confident_slots], c_pseudo,
                                        c_sure, class_mask)
    lam = jax.random.beta(key_lam, cfg.mixup_alpha, cfg.mixup_alpha)
    mixed_x = mixup(lam, uncertain_x, confident_x)
    mixed_targets = mixup(lam, u_targets, c_targets)
    mixup_entry_weights = (u_sure & c_sure).astype(jnp.float32)

    logits, _ = ctx.student(jnp.concatenate([ctx.view("strong", key_strong), mixed_x]))
    keep = 1.0 - ctx.batch["uncertain"]
    kept = ctx.weight * keep
    if cfg.reference_reduction:  # a config constant: one program per run either way
      pos_weight = frame.client["pos_weight"]
      main = reference_reduction_bce(logits[:batch_size], targets, entry_weights * pos_weight,
                                     kept)
      mix = jnp.mean(reference_reduction_bce(logits[batch_size:], mixed_targets,
                                             mixup_entry_weights, jnp.ones((pairs,))))
    else:
      main = weighted_bce(logits[:batch_size], targets, entry_weights)
      mix = jnp.mean(weighted_bce(logits[batch_size:], mixed_targets, mixup_entry_weights))
    has_pools = (jnp.sum(frame.per_sample["uncertain"]) > 0) & (
        jnp.sum(frame.per_sample["confident"]) > 0)
    per_sample = combine_losses(main, keep, ctx.weight, jnp.where(has_pools, mix, 0.0),
                                cfg.mixup_weight)

    missing = 1.0 - class_mask
    seen = {
        "confident_missing": jnp.sum(kept[:, None] * confident * missing),
        "missing_entries": jnp.sum(kept) * jnp.sum(missing),
        "pseudo_positives": jnp.sum(kept[:, None] * confident * (pseudo == 1.0) * missing,
                                    axis=0),
        "observed_positives": jnp.sum(kept[:, None] * ctx.batch["targets"] * class_mask, axis=0),
    }
    return per_sample, jax.lax.stop_gradient(seen)

  def update_local(self, phase, local, *, frame, grads, aux, slot, weight, active, epoch_end,
                   params, batch_stats) -> dict:
    del phase, frame, grads, slot, weight, epoch_end
    teacher = local["teacher"]
    updated = {"params": ema_update(teacher["params"], params, self.cfg.ema_decay),
               "batch_stats": batch_stats}  # buffers are copied (ModelEMA.update)
    teacher = jax.tree.map(lambda new, old: jnp.where(active, new, old), updated, teacher)
    seen = jax.tree.map(jnp.add, local["seen"], aux)
    return {"teacher": teacher, "seen": seen}

  def local_output(self, phase, local, *, frame, variables, key):
    del phase, frame, variables, key
    return local["seen"]

  def aggregate(self, client_vars, clients, global_vars):
    """The body by `config.aggregation` (default: the sample-count weighted mean), the head class
    by class with the clients' positive counts (`classwise_head_mean`)."""
    body = super().aggregate(client_vars, clients, global_vars)
    head = client_vars["params"]["head"]
    weights = aggregation.client_weights(clients["count"], self.config.fl.client_weighting)
    kernel, bias = classwise_head_mean(head["kernel"], head["bias"],
                                       clients["per_client"]["class_positives"], weights)
    params = dict(body["params"], head=dict(body["params"]["head"], kernel=kernel, bias=bias))
    return dict(body, params=params)
