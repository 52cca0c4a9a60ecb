"""The single-label classification task: softmax head, cross-entropy, accuracy and macro metrics.

Each image has exactly one class out of C (CIFAR-10, Clothing1M and the embedded digits in the seed
papers' setting). Labels stay one-hot (N, C) float arrays everywhere, as the multi-label task's
multi-hot ones, so the engine, the client arrays and the methods' per-sample tables keep their
shapes; soft targets (rows on the simplex) are accepted by the loss. Every client annotates every
class (`labels.annotation_num` must be C), so the `class_mask` the engine passes is all ones and
the loss ignores it.
"""

from __future__ import annotations

import jax
import numpy as np

from fednml_jax import losses, metrics


class SingleLabelTask:
  """Exactly one class per image (softmax over the classes)."""

  name = "singlelabel"
  headline_metric = "Accuracy"

  def num_outputs(self, num_classes: int) -> int:
    return num_classes

  def probabilities(self, logits):
    return jax.nn.softmax(logits.astype(np.float32), axis=-1)

  def supervised_loss(self, logits, targets, class_mask):
    """Per-sample softmax cross-entropy against one-hot or soft `targets`; `class_mask` (all ones
    for single-label clients) is not used."""
    del class_mask
    return losses.softmax_cross_entropy(logits, targets)

  def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict:
    return metrics.singlelabel_metrics(probs, labels)

  def prior_baseline(self, train_labels: np.ndarray, labels: np.ndarray) -> dict:
    return metrics.class_prior_metrics(train_labels, labels, score=metrics.singlelabel_metrics)
