"""Evaluation metrics (ALGORITHMS.md §4; reference `test_inference`).

Multi-label (`multilabel_metrics`): `p = sigmoid(logits)`, prediction `p > 0.5`. Per class: average
precision (scikit-learn `average_precision_score`), precision, recall, F1 = 2PR/(P+R) (0 where
undefined), balanced accuracy (TPR+TNR)/2 and AUROC. The report is the macro mean of each over the
classes that have at least one positive in the evaluated split; how many classes were left out is
reported as `classes_skipped`. AUROC additionally needs a negative, so its mean runs over the
classes that have both.

Single-label (`singlelabel_metrics`): `p = softmax(logits)`, prediction = the arg-max class, read as
a one-hot row. The same per-class metrics are computed one-vs-rest (AP and AUROC from each class's
probability column, precision, recall, F1 and BAcc from the one-hot prediction) and macro-averaged
the same way, plus `Accuracy`, the fraction of samples whose arg-max is their class.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm

HEADLINE = ("mAP", "F1", "Recall", "BAcc", "Precision", "AUROC")


def per_class_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5,
                      preds: np.ndarray | None = None) -> dict:
  """Per-class metric arrays of shape (C,); NaN where a metric is undefined for that class.

  AP and AUROC rank `probs`; precision, recall, F1 and BAcc count the 0/1 predictions `preds`
  (N, C), by default `probs > threshold`.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.shape != labels.shape or probs.ndim != 2:
    raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be equal (N, C) shapes")
  labels = (labels > 0.5).astype(np.int64)
  if preds is None:
    preds = probs > threshold
  preds = np.asarray(preds).astype(np.int64)
  tp = (preds * labels).sum(0).astype(np.float64)
  fp = (preds * (1 - labels)).sum(0).astype(np.float64)
  fn = ((1 - preds) * labels).sum(0).astype(np.float64)
  tn = ((1 - preds) * (1 - labels)).sum(0).astype(np.float64)
  pos, neg = tp + fn, tn + fp
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    recall = np.where(pos > 0, tp / pos, np.nan)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    specificity = np.where(neg > 0, tn / neg, np.nan)
  bacc = (recall + specificity) / 2
  ap = np.full(labels.shape[1], np.nan)
  auroc = np.full(labels.shape[1], np.nan)
  for c in range(labels.shape[1]):
    if pos[c] == 0:
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ap[c] = skm.average_precision_score(labels[:, c], probs[:, c])
      if neg[c] > 0:
        auroc[c] = skm.roc_auc_score(labels[:, c], probs[:, c])
  has_pos = pos > 0
  # A class with no positive has undefined recall; F1, precision and BAcc are reported only where
  # the class is evaluable, so that they average over the same classes as mAP.
  nan_unless = lambda a: np.where(has_pos, a, np.nan)  # noqa: E731
  return {"AP": ap, "Precision": nan_unless(precision), "Recall": recall,
          "F1": nan_unless(f1), "BAcc": nan_unless(bacc), "AUROC": auroc,
          "positives": pos.astype(np.int64)}


def _macro_means(per_class: dict) -> dict:
  """The macro means of `per_class_metrics`' arrays over the classes where each is defined."""
  out = {}
  for name, key in (("mAP", "AP"), ("F1", "F1"), ("Recall", "Recall"), ("BAcc", "BAcc"),
                    ("Precision", "Precision"), ("AUROC", "AUROC")):
    values = per_class[key]
    finite = values[~np.isnan(values)]
    out[name] = float(finite.mean()) if finite.size else None
  out["classes_evaluated"] = int((per_class["positives"] > 0).sum())
  out["classes_skipped"] = int((per_class["positives"] == 0).sum())
  out["per_class_AP"] = [None if np.isnan(v) else float(v) for v in per_class["AP"]]
  return out


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
  """Macro means of the paper's metrics (`mAP`, `F1`, `Recall`, `BAcc`) plus `Precision`, `AUROC`.

  Classes without a positive in `labels` are left out of every mean and counted in
  `classes_skipped`; a metric with no evaluable class at all is reported as None.
  """
  return _macro_means(per_class_metrics(probs, labels, threshold))


def singlelabel_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
  """`Accuracy` and the macro one-vs-rest means of `multilabel_metrics` for softmax outputs.

  probs (N, C) class probabilities; labels (N, C) one-hot. Precision, recall, F1 and BAcc score the
  one-hot arg-max prediction (ties go to the lowest class); classes without a positive in `labels`
  are left out of the means as in `multilabel_metrics`.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.shape != labels.shape or probs.ndim != 2:
    raise ValueError(f"probs {probs.shape} and labels {labels.shape} must be equal (N, C) shapes")
  if not np.all((labels > 0.5).sum(axis=1) == 1):
    raise ValueError("single-label metrics need one-hot labels: exactly one positive per row")
  predicted = np.argmax(probs, axis=1)
  preds = np.zeros(probs.shape, np.int64)
  preds[np.arange(len(predicted)), predicted] = 1
  out = _macro_means(per_class_metrics(probs, labels, preds=preds))
  out["Accuracy"] = float(np.mean(predicted == np.argmax(labels, axis=1))) if len(labels) else None
  return out


def class_prior_metrics(train_labels: np.ndarray, eval_labels: np.ndarray,
                        score=multilabel_metrics) -> dict:
  """Metrics (`score(probs, labels)`) of the predictor that outputs each class's training
  frequency for every image.

  The baseline the paper's tables should beat: its mAP equals the mean positive rate of the
  evaluable classes. With `score=singlelabel_metrics` it always predicts the most frequent
  training class, so its accuracy is that class's share of the evaluated split.
  """
  prior = np.asarray(train_labels, np.float64).mean(0)
  probs = np.broadcast_to(prior, np.asarray(eval_labels).shape)
  return score(probs, eval_labels)
