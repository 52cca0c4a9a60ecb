"""The multi-label classification task: sigmoid head, masked BCE, macro metrics.

A task is the piece of the problem the engine must not special-case: how many outputs the model
head has, how outputs become probabilities, the supervised loss on a client's (possibly partial)
labels, and how predictions are scored. Methods build their losses on top of `supervised_loss` and
`probabilities`; the engine only calls `probabilities` (evaluation) and the method's loss.
"""

from __future__ import annotations

import jax
import numpy as np

from fednml_jax import losses, metrics


class MultiLabelTask:
  """Each class is an independent yes/no decision (sigmoid per class)."""

  name = "multilabel"
  headline_metric = "mAP"

  def num_outputs(self, num_classes: int) -> int:
    return num_classes

  def probabilities(self, logits):
    return jax.nn.sigmoid(logits.astype(np.float32))

  def supervised_loss(self, logits, targets, class_mask):
    """Per-sample BCE over the annotated classes (`class_mask`)."""
    return losses.masked_bce_with_logits(logits, targets, class_mask)

  def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict:
    return metrics.multilabel_metrics(probs, labels)

  def prior_baseline(self, train_labels: np.ndarray, labels: np.ndarray) -> dict:
    return metrics.class_prior_metrics(train_labels, labels)
