"""Metrics against a tiny case computed by hand (ALGORITHMS.md §4)."""

import numpy as np
import pytest

from fednml_jax import metrics


def test_multilabel_metrics_by_hand():
  labels = np.array([[1, 0, 0],
                     [0, 1, 0],
                     [1, 1, 0],
                     [0, 0, 0]])
  probs = np.array([[0.9, 0.2, 0.1],
                    [0.6, 0.4, 0.3],
                    [0.4, 0.8, 0.2],
                    [0.1, 0.7, 0.4]])
  m = metrics.per_class_metrics(probs, labels)
  # Class 0: scores 0.9(+), 0.6(-), 0.4(+), 0.1(-). Ranked: + - + -: AP = (1/1 + 2/3)/2 = 5/6.
  # Predictions >0.5: samples 0, 1 → TP 1, FP 1, FN 1, TN 1: P = R = F1 = 0.5, BAcc = 0.5.
  assert m["AP"][0] == pytest.approx(5 / 6)
  assert (m["Precision"][0], m["Recall"][0], m["F1"][0], m["BAcc"][0]) == (0.5, 0.5, 0.5, 0.5)
  # AUROC class 0: pairs (+0.9 vs -0.6, -0.1), (+0.4 vs -0.6 ✗, -0.1 ✓) → 3/4.
  assert m["AUROC"][0] == pytest.approx(0.75)
  # Class 1: 0.8(+), 0.7(-), 0.4(+), 0.2(-): AP = (1 + 2/3)/2 = 5/6; preds: samples 2, 3
  # → TP 1 FP 1 FN 1 TN 1.
  assert m["AP"][1] == pytest.approx(5 / 6)
  # Class 2 has no positive: left out of every mean.
  assert np.isnan(m["AP"][2]) and np.isnan(m["F1"][2])
  out = metrics.multilabel_metrics(probs, labels)
  assert out["mAP"] == pytest.approx(5 / 6)
  assert out["F1"] == pytest.approx(0.5) and out["BAcc"] == pytest.approx(0.5)
  assert out["classes_evaluated"] == 2 and out["classes_skipped"] == 1


def test_f1_is_zero_when_nothing_is_predicted():
  out = metrics.multilabel_metrics(np.full((3, 1), 0.1), np.array([[1], [0], [1]]))
  assert out["F1"] == 0.0 and out["Recall"] == 0.0 and out["Precision"] == 0.0
  assert out["BAcc"] == pytest.approx(0.5)


def test_no_evaluable_class_gives_none_not_nan():
  out = metrics.multilabel_metrics(np.full((2, 2), 0.3), np.zeros((2, 2)))
  assert out["mAP"] is None and out["classes_skipped"] == 2


def test_class_prior_map_equals_positive_rate():
  train = np.array([[1, 0], [0, 1], [1, 1], [1, 0]])
  test = np.array([[1, 0], [0, 1], [0, 0], [1, 0]])
  out = metrics.class_prior_metrics(train, test)
  # Constant scores: AP = positive rate of the test split: (2/4 + 1/4) / 2.
  assert out["mAP"] == pytest.approx(0.375)
