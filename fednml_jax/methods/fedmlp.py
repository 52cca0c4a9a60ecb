r"""FedMLP (Sun, Wu, Shi, Yu, Yang, Cheng and Yan, "FedMLP: Federated Multi-Label Medical Image
Classification under Task Heterogeneity", MICCAI 2024), on partially annotated, noisy multi-label
data (ALGORITHMS.md §3).

Reference: szbonaldo/FedMLP, `main.py` (the schedule and the server's prototype average),
`utils/local_training.py` (`LocalUpdate.train_FedMLP`: both stages' losses, the prototypes, the
pseudo-label selection; `DatasetSplit_pseudo`: which entries stage 2 trains on), `utils/FedAvg.py`
(`FedAvg_proto`), `utils/utils.py` (`max_m_indices` / `min_n_indices`), `utils/options.py` (the
constants). The public code does not run as published (`main.py` dispatches on the misspelt
`'FeMLP'` and `dataset.py` builds no two-view dataset for it), so this follows the paper's two
stages as ALGORITHMS.md condenses them and takes the constants and details from the code.

Schedule (`phase`):
- **stage 1** (`rnd < stage1_rounds`, the reference's `rounds_FedMLP_stage1` = 50): every client
  sees two weak views of its batch (the reference's `image_aug_1` / `image_aug_2`, two draws of the
  same random affine + flip) and minimises `stage1_loss`: BCE on its annotated classes, averaged
  over the two views, plus the MSE between its probabilities and the frozen global model's
  (eval mode, same view) on its missing classes, averaged over the two views; weight 1 each (the
  reference's `loss_sup + loss_dis`; its view-consistency term has weight 0.0 and is left out).
- **stage 2** (`rnd >= stage1_rounds`), before each round's local training, on the host
  (`before_round`): with the received global model's penultimate features `f` on every training
  slot under the weak view (eval mode, `ctx.predict_train(with_features=True)`; the reference's
  `net(images1)` with the received model before training),
  1. class prototypes (`client_prototypes`, `average_prototypes`): per client and annotated class
     c, the mean feature of its samples observed negative (`P0_c`) and positive (`P1_c`); the
     server averages them over the clients that annotate c, weighted by sample count
     (`FedAvg_proto`'s `dict_len`);
  2. per missing class c of client k, `sim = cos(f, P0_c) − cos(f, P1_c)` on the slots not yet
     pseudo-labelled for c (`prototype_similarity`); `select_pseudo_labels` adds the
     `int(negative_fraction·#{sim ≥ 0})` highest as pseudo-negatives and the
     `int(positive_fraction·#{sim < 0})` lowest as pseudo-positives (the reference's
     `clean_threshold` 0.005 and `noise_threshold` 0.01, fractions of that client's not yet
     labelled samples of that class on each side of sim = 0). Pseudo-labels accumulate over the
     rounds and are never revised (the reference's `traindata_idx[...].extend`).
  Local training then minimises BCE over the batch's supervised entries (`supervised_entries_loss`):
  the annotated entries (observed labels) and the pseudo-labelled missing entries; the other
  missing entries are not trained on (the reference's `(loss_sup * sup_cls).sum() /
  sup_cls.sum()`; its distillation on them is commented out). One weak view.
Aggregation: `config.aggregation` with `fl.client_weighting` (the reference's `FedAvg(w, dict_len)`
is the default sample-count mean).

Multi-label adaptations and choices where the paper or code is silent or broken:
- FedMLP is already multi-label. The annotated/missing split is this project's `setup.annotated`
  (per client); labels on annotated classes are the noisy observed ones, as in the reference. The
  reference's `LogitAdjust_Multilabel` criterion is plain BCE on probabilities (its adjustment is
  commented out); here BCE is computed from logits (`optax.sigmoid_binary_cross_entropy`), the same
  function wherever float32's sigmoid does not saturate.
- Loss normalisation: stage 1 averages over the annotated (BCE) and missing (MSE) entries, which
  per sample is the mean over its annotated resp. missing classes (every sample of a client has
  the same classes); a client that annotates every class has no MSE term (the reference would
  divide by 0). Stage 2 averages over the batch's supervised *entries* as the reference does, so
  a pseudo-labelled sample weighs more than one without pseudo-labels.
- Prototypes come from the received global model's features, on the host, and are recomputed
  from scratch every stage-2 round. The reference computes them on each client with its locally
  trained model at the end of the previous round and replaces the server's prototypes with the
  new average every round (`Prototype = (1 − lam)·P + lam·new` with `lam = 1.0`, i.e. no EMA). Ours
  use the same model as the similarity features (the average of those local models), so the query
  and prototype features share one feature space, cost no extra pass on the clients, and need no
  prototype state across rounds (whose feature size `init_state` could not know).
- A client without any observed negative (or positive) of an annotated class contributes no
  `P0_c` (or `P1_c`); the reference would contribute NaN (stage 1) or a zero vector (stage 2). A
  missing class without both prototypes (no client annotates it, or none has a positive) gets no
  pseudo-label that round; the record lists such classes.
- Cosine similarity divides by `max(‖f‖·‖P‖, 1e-8)`, so a zero feature vector has sim 0 (it counts
  on the pseudo-negative side). Ties in sim keep slot order (the reference's stable `sorted`).
- The reference's self-adaptive thresholds (`tao`, `FedAvg_tao`) are computed but unused (the
  fixed fractions replace them in `train_FedMLP`), so they are not implemented.
- The local optimiser, learning rate, batch size and epochs are the engine's (`config.optim`,
  `config.fl`); the reference uses Adam (lr 3e-5, weight decay 5e-4), batch 32, 1 local epoch.

Host state (plain numpy, checkpointable): `pseudo_negative` and `pseudo_positive`, (K, n_max, C)
bool. `client_arrays` gives the clients `targets` (observed labels, 1 at pseudo-positives) and
`supervised` (1 on annotated and pseudo-labelled entries) per sample, `class_mask` per client.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fednml_jax.losses import masked_class_mean
from fednml_jax.methods import common
from fednml_jax.methods.base import Method

COSINE_EPS = 1e-8


# Device side: losses (pure, per sample) -----------------------------------------------------------
def stage1_loss(logits_views, teacher_logits_views, targets, class_mask):
  """Per-sample stage-1 loss (B,): over the views, the mean of BCE-with-logits on the annotated
  classes (`class_mask` 1) plus the mean of `(σ(z) − σ(t))²` on the missing ones (`class_mask` 0),
  each averaged over its classes. `logits_views` / `teacher_logits_views`: sequences of (B, C)
  logits, one per view; the teacher receives no gradient."""
  class_mask = jnp.asarray(class_mask, jnp.float32)
  targets = targets.astype(jnp.float32)
  supervised, distilled = [], []
  for logits, teacher in zip(logits_views, teacher_logits_views):
    logits = logits.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, targets)
    supervised.append(masked_class_mean(bce, class_mask))
    soft_teacher = jax.nn.sigmoid(jax.lax.stop_gradient(teacher).astype(jnp.float32))
    squared = jnp.square(jax.nn.sigmoid(logits) - soft_teacher)
    distilled.append(masked_class_mean(squared, 1.0 - class_mask))
  return sum(supervised) / len(supervised) + sum(distilled) / len(distilled)


def supervised_entries_loss(logits, targets, entry_mask, weight):
  """Per-sample stage-2 values (B,) whose `weight`-ed batch mean (the engine's) is the mean
  BCE-with-logits over the batch's supervised entries (`entry_mask` (B, C) = 1), the reference's
  `(loss * sup_cls).sum() / sup_cls.sum()`: sample i gives `Σ_c m_ic·BCE_ic · Σ_j w_j / Σ_j w_j·Σ_c
  m_jc`. A batch without a supervised entry gives 0."""
  weight = weight.astype(jnp.float32)
  mask = entry_mask.astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
  entries = jnp.sum(weight[:, None] * mask)
  return jnp.sum(bce * mask, axis=-1) * jnp.sum(weight) / jnp.maximum(entries, 1.0)


# Host side: prototypes and pseudo-labels (numpy) --------------------------------------------------
def client_prototypes(features, labels, annotated, valid):
  """Each client's class prototypes: `(means (K, 2, C, D), counts (K, 2, C))`, where
  `means[k, v, c]` is the mean feature of client k's valid samples whose observed label of class c
  is v (0 or 1), for the classes it annotates; 0 where there is no such sample (`counts` = 0).

  `features` (K, n, D), `labels` (K, n, C) 0/1, `annotated` (K, C) bool, `valid` (K, n) bool."""
  features = np.asarray(features, np.float64)
  positive = np.asarray(labels) > 0.5
  cells = np.asarray(valid, bool)[:, :, None] & np.asarray(annotated, bool)[:, None, :]
  members = np.stack([cells & ~positive, cells & positive], axis=1).astype(np.float64)  # K,2,n,C
  sums = np.einsum("kvnc,knd->kvcd", members, features)
  counts = members.sum(axis=2)
  means = sums / np.maximum(counts, 1.0)[..., None]
  return means, counts.astype(np.int64)


def average_prototypes(client_means, client_counts, annotated, weights):
  """The server's prototypes `(prototypes (2, C, D), present (2, C) bool)`: for each class c and
  label v, the `weights`-weighted mean of `client_means[k, v, c]` over the clients k that annotate
  c and have a sample of label v (`FedAvg_proto` with `weights` = sample counts); `present` is
  False (and the prototype 0) where no client qualifies."""
  contributes = (np.asarray(annotated, bool)[:, None, :] & (np.asarray(client_counts) > 0))
  w = np.asarray(weights, np.float64)[:, None, None] * contributes  # (K, 2, C)
  total = w.sum(axis=0)
  summed = np.einsum("kvc,kvcd->vcd", w, np.asarray(client_means, np.float64))
  present = total > 0
  return summed / np.where(present, total, 1.0)[..., None], present


def prototype_similarity(features, prototypes):
  """`cos(f, P0_c) − cos(f, P1_c)` for every feature row and class: `features` (..., D),
  `prototypes` (2, C, D) → (..., C). Cosines divide by `max(‖f‖·‖P‖, COSINE_EPS)`."""
  features = np.asarray(features, np.float64)
  prototypes = np.asarray(prototypes, np.float64)
  dots = np.einsum("...d,vcd->...vc", features, prototypes)
  norms = (np.linalg.norm(features, axis=-1)[..., None, None]
           * np.linalg.norm(prototypes, axis=-1))
  cosine = dots / np.maximum(norms, COSINE_EPS)
  return cosine[..., 0, :] - cosine[..., 1, :]


def select_pseudo_labels(similarity, candidates, negative_fraction, positive_fraction):
  """One client and missing class: `(negatives, positives)`, disjoint bool masks (n,) within
  `candidates` (the valid slots not yet pseudo-labelled for the class).

  Of the candidates, the `int(negative_fraction · #{sim ≥ 0})` with the highest `similarity`
  become pseudo-negatives and the `int(positive_fraction · #{sim < 0})` with the lowest
  pseudo-positives (`max_m_indices` / `min_n_indices` in the reference; ties keep slot order)."""
  similarity = np.asarray(similarity, np.float64)
  index = np.flatnonzero(np.asarray(candidates, bool))
  sim = similarity[index]
  num_negative = int(negative_fraction * np.count_nonzero(sim >= 0))
  num_positive = int(positive_fraction * np.count_nonzero(sim < 0))
  negatives = np.zeros(similarity.shape, bool)
  positives = np.zeros(similarity.shape, bool)
  negatives[index[np.argsort(-sim, kind="stable")[:num_negative]]] = True
  positives[index[np.argsort(sim, kind="stable")[:num_positive]]] = True
  return negatives, positives


# Diagnostics --------------------------------------------------------------------------------------
def pseudo_label_quality(negatives, positives, clean, missing_entries) -> dict:
  """Counts and accuracies of pseudo-labels against the clean labels: `negatives` / `positives` /
  `clean` / `missing_entries` are bool arrays of one shape (the pseudo-labels lie on missing
  entries). `positive_recall` is the share of the hidden positives of missing entries found."""
  clean = np.asarray(clean, bool)
  missing_entries = np.asarray(missing_entries, bool)
  num_negative, num_positive = int(negatives.sum()), int(positives.sum())
  right_negative = int((negatives & ~clean).sum())
  right_positive = int((positives & clean).sum())
  hidden_positive = int((missing_entries & clean).sum())
  return {
      "negatives": num_negative,
      "negative_accuracy": common.ratio(right_negative, num_negative),
      "positives": num_positive,
      "positive_accuracy": common.ratio(right_positive, num_positive),
      "accuracy": common.ratio(right_negative + right_positive, num_negative + num_positive),
      "missing_entries": int(missing_entries.sum()),
      "labelled_fraction": common.ratio(num_negative + num_positive, int(missing_entries.sum())),
      "hidden_positives": hidden_positive,
      "positive_recall": common.ratio(right_positive, hidden_positive),
  }


# The method ---------------------------------------------------------------------------------------
class FedMLP(Method):
  """FedMLP (ALGORITHMS.md §3); see the module docstring for the choices made."""

  name = "fedmlp"
  supported_tasks = ("multilabel",)  # sigmoid, per-class formulation

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.stage1_rounds = 50  # the reference's rounds_FedMLP_stage1: stage 2 starts at this round
    c.negative_fraction = 0.005  # the reference's clean_threshold (pseudo-negatives per round)
    c.positive_fraction = 0.01  # the reference's noise_threshold (pseudo-positives per round)
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.cfg = cfg = config.fedmlp
    checks = [
        ("stage1_rounds", common.is_int(cfg.stage1_rounds) and cfg.stage1_rounds >= 0,
         "a non-negative integer"),
        ("negative_fraction", 0.0 <= cfg.negative_fraction <= 1.0, "in [0, 1]"),
        ("positive_fraction", 0.0 <= cfg.positive_fraction <= 1.0, "in [0, 1]"),
    ]
    common.check_constants("fedmlp", cfg, checks)
    if cfg.stage1_rounds == 0:
      logging.warning("config.fedmlp.stage1_rounds = 0: prototypes come from the initial "
                      "(untrained) global model.")
    layout = setup.layout
    self.observed = layout.gather(np.asarray(setup.observed_labels, np.float32))
    self.annotated = np.asarray(setup.annotated, bool)

  # Schedule ------------------------------------------------------------------------------------
  def phase(self, rnd: int) -> str:
    return "stage1" if rnd < self.cfg.stage1_rounds else "stage2"

  # Host state ----------------------------------------------------------------------------------
  def init_state(self) -> dict:
    empty = np.zeros(self.observed.shape, bool)
    return {"pseudo_negative": empty, "pseudo_positive": empty.copy()}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    positive = np.asarray(state["pseudo_positive"], bool)
    pseudo = np.asarray(state["pseudo_negative"], bool) | positive
    supervised = (self.annotated[:, None, :] | pseudo) & self.setup.layout.valid[:, :, None]
    per_sample = {"targets": np.where(positive, 1.0, self.observed).astype(np.float32),
                  "supervised": supervised.astype(np.float32)}
    return per_sample, {"class_mask": self.annotated.astype(np.float32)}

  def before_round(self, ctx, state: dict):
    rnd, cfg = ctx.round, self.cfg
    if rnd < cfg.stage1_rounds:
      return state, False, {}
    layout = self.setup.layout
    _, features = ctx.predict_train(with_features=True)
    features = np.asarray(features, np.float64)
    means, counts = client_prototypes(features, self.observed, self.annotated, layout.valid)
    prototypes, present = average_prototypes(means, counts, self.annotated, layout.counts)
    usable = present.all(axis=0)  # (C,): both prototypes exist
    similarity = prototype_similarity(features, prototypes)  # (K, n_max, C)
    old_negative = np.asarray(state["pseudo_negative"], bool)
    old_positive = np.asarray(state["pseudo_positive"], bool)
    new_negative = np.zeros_like(old_negative)
    new_positive = np.zeros_like(old_positive)
    for k in range(layout.num_real_clients):
      for c in np.flatnonzero(~self.annotated[k] & usable):
        candidates = layout.valid[k] & ~old_negative[k, :, c] & ~old_positive[k, :, c]
        new_negative[k, :, c], new_positive[k, :, c] = select_pseudo_labels(
            similarity[k, :, c], candidates, cfg.negative_fraction, cfg.positive_fraction)
    new_state = {"pseudo_negative": old_negative | new_negative,
                 "pseudo_positive": old_positive | new_positive}
    record = self._pseudo_label_record(rnd, prototypes, present, new_state, new_negative,
                                       new_positive)
    total = record["total"]
    logging.info("fedmlp round %d: +%d/+%d pseudo-negatives/positives, so far %d (acc %s) / %d "
                 "(acc %s)", rnd, record["added"]["negatives"], record["added"]["positives"],
                 total["negatives"], common.fmt(total["negative_accuracy"]), total["positives"],
                 common.fmt(total["positive_accuracy"]))
    changed = bool(new_negative.any() or new_positive.any())
    return new_state, changed, record

  def _pseudo_label_record(self, rnd, prototypes, present, state, new_negative, new_positive):
    layout = self.setup.layout
    num_real = layout.num_real_clients
    clean = layout.gather(np.asarray(self.setup.clean_labels) > 0.5, fill=False)[:num_real]
    missing = (layout.valid[:, :, None] & ~self.annotated[:, None, :])[:num_real]
    negative = state["pseudo_negative"][:num_real]
    positive = state["pseudo_positive"][:num_real]
    norms = np.linalg.norm(prototypes, axis=-1)
    between = np.einsum("cd,cd->c", prototypes[0], prototypes[1]) / np.maximum(
        norms[0] * norms[1], COSINE_EPS)
    clients = [{"client": k, "missing_classes": np.flatnonzero(~self.annotated[k]).tolist(),
                **pseudo_label_quality(negative[k], positive[k], clean[k], missing[k])}
               for k in range(num_real)]
    return {
        "stage2_round": rnd - int(self.cfg.stage1_rounds),
        "classes_without_prototypes": np.flatnonzero(~present.all(axis=0)).tolist(),
        # cos(P0_c, P1_c): how far apart the two prototypes of each class are (None: missing).
        "prototype_cosine": [float(v) if ok else None
                             for v, ok in zip(between, present.all(axis=0))],
        "added": pseudo_label_quality(new_negative[:num_real], new_positive[:num_real], clean,
                                      missing),
        "total": pseudo_label_quality(negative, positive, clean, missing),
        "clients": clients,
    }

  # Device side ---------------------------------------------------------------------------------
  def local_loss(self, phase, ctx):
    if phase == "stage1":
      keys = jax.random.split(ctx.key)
      views = [ctx.view("weak", key) for key in keys]
      logits = [ctx.student(x)[0] for x in views]
      teacher = [ctx.frame.teacher_logits(x) for x in views]
      return stage1_loss(logits, teacher, ctx.batch["targets"],
                         ctx.frame.client["class_mask"]), {}
    logits, _ = ctx.student(ctx.view("weak"))
    return supervised_entries_loss(logits, ctx.batch["targets"], ctx.batch["supervised"],
                                   ctx.weight), {}


