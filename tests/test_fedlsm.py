"""Tests of fednml_jax.methods.fedlsm: the pseudo-labels, the EMA teacher, the entropy pools, the
loss weights and the class-wise head aggregation with numbers worked by hand, the host step on a
hand-made federation, and one tiny end-to-end run."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError
from fednml_jax.losses import weighted_batch_mean
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.methods.fedlsm import (FedLSM, classwise_head_mean, combine_losses, ema_update,
                                       entropy_pools, fill_missing_classes, global_pos_weight,
                                       missing_class_entropy, mixup, pool_sizes, pseudo_labels,
                                       reference_reduction_bce, weighted_bce)
from fednml_jax.tasks import get_task

from conftest import tiny_config

LN2 = math.log(2.0)


def test_registered_with_reference_defaults():
  assert METHODS["fedlsm"] is FedLSM and FedLSM.supported_tasks == ("multilabel",)
  c = base_config().fedlsm
  assert (c.ema_decay, c.pseudo_high, c.pseudo_low, c.uncertain_high, c.uncertain_low,
          c.mixup_alpha, c.mixup_weight, c.mixup_pairs, c.reference_reduction) == (
              0.999, 0.85, 0.01, 0.7, 0.005, 0.2, 0.1, 4, False)
  assert (c.uncertain_fraction, c.confident_fraction) == (0.05, 0.2)


@pytest.mark.parametrize("key,value", [("ema_decay", 1.5), ("pseudo_low", 0.9),
                                       ("uncertain_fraction", 1.0), ("mixup_pairs", 0)])
def test_bad_constants_name_their_key(key, value):
  setup = hand_setup()
  setup.config.fedlsm[key] = value
  with pytest.raises(ConfigError, match=f"config.fedlsm.{key}"):
    FedLSM(setup.config, setup)


# Pseudo-labels and losses -------------------------------------------------------------------------
def test_pseudo_labels_and_weights_by_hand():
  p = jnp.array([[0.9, 0.85, 0.5, 0.01, 0.005]])
  targets, confident = pseudo_labels(p, 0.85, 0.01)
  # ≥ 0.85 → 1 and ≤ 0.01 → 0, both inclusive; 0.5 stays soft and unconfident.
  np.testing.assert_allclose(targets, [[1.0, 1.0, 0.5, 0.0, 0.0]])
  np.testing.assert_array_equal(confident, [[True, True, False, True, True]])
  # Class 0 is annotated: its observed label (0) with weight 1 whatever the teacher says; the
  # missing classes take the pseudo-labels, weight 1 where confident and 0 on the soft entry.
  observed = jnp.array([[0.0, 0.0, 0.0, 1.0, 1.0]])  # a missing class's observed value is unused
  filled, weights = fill_missing_classes(observed, targets, confident,
                                         jnp.array([1.0, 0.0, 0.0, 0.0, 0.0]))
  np.testing.assert_allclose(filled, [[0.0, 1.0, 0.5, 0.0, 0.0]])
  np.testing.assert_allclose(weights, [[1.0, 1.0, 0.0, 1.0, 1.0]])


def test_weighted_bce_by_hand():
  logits = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  targets = jnp.array([[1.0, 0.5], [0.0, 1.0]])
  weights = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  # BCE-with-logits at z = 0 is ln 2 for any target; sample 0 keeps one of its two entries.
  np.testing.assert_allclose(weighted_bce(logits, targets, weights), [LN2 / 2, LN2], rtol=1e-6)
  # The reference's reduction: mean BCE (every entry, ln 2) × mean weight (3/4), per sample.
  got = reference_reduction_bce(logits, targets, weights, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(got, [0.75 * LN2, 0.75 * LN2], rtol=1e-6)
  # Padding (sample weight 0) does not enter the mean weight: only sample 1 (mean weight 1).
  got = reference_reduction_bce(logits, targets, weights, jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(got, [LN2, LN2], rtol=1e-6)


def test_global_pos_weight_is_negatives_over_positives():
  labels = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
  np.testing.assert_allclose(global_pos_weight(labels), [1.0, 3.0, 0.0])


def test_mixup_and_the_mixup_loss_weight():
  np.testing.assert_allclose(mixup(0.25, jnp.array([4.0, 0.0]), jnp.array([0.0, 8.0])), [1.0, 6.0])
  main = jnp.array([1.0, 2.0, 3.0, 4.0])
  keep = jnp.array([1.0, 0.0, 1.0, 1.0])  # sample 1 is in the uncertain pool
  weight = jnp.array([1.0, 1.0, 1.0, 0.0])  # sample 3 is padding
  per_sample = combine_losses(main, keep, weight, jnp.float32(0.5), 0.1)
  # The engine's weighted batch mean: mean main over samples 0 and 2, (1 + 3)/2 = 2, + 0.1·0.5.
  assert float(weighted_batch_mean(per_sample, weight)) == pytest.approx(2.05, rel=1e-6)
  # A batch of uncertain samples only trains the mixup term.
  per_sample = combine_losses(main, jnp.zeros(4), weight, jnp.float32(0.5), 0.1)
  assert float(weighted_batch_mean(per_sample, weight)) == pytest.approx(0.05, rel=1e-6)


# EMA teacher --------------------------------------------------------------------------------------
def test_ema_update_by_hand():
  got = ema_update({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, -2.0])}, 0.9)
  # 0.9·1 + 0.1·3 = 1.2;  0.9·2 + 0.1·(−2) = 1.6.
  np.testing.assert_allclose(got["w"], [1.2, 1.6], rtol=1e-6)
  setup = hand_setup()
  setup.config.fedlsm.ema_decay = 0.9
  method = FedLSM(setup.config, setup)
  local = {"teacher": {"params": {"w": jnp.array([1.0, 2.0])}, "batch_stats": {"m": jnp.ones(2)}},
           "seen": {"n": jnp.float32(1.0)}}
  kwargs = dict(frame=None, grads={}, aux={"n": jnp.float32(2.0)}, slot=None, weight=None,
                epoch_end=False, params={"w": jnp.array([3.0, -2.0])},
                batch_stats={"m": jnp.array([5.0, 6.0])})
  new = method.update_local("train", local, active=jnp.bool_(True), **kwargs)
  np.testing.assert_allclose(new["teacher"]["params"]["w"], [1.2, 1.6], rtol=1e-6)
  # BatchNorm statistics are copied from the student, not averaged (ModelEMA's buffers).
  np.testing.assert_allclose(new["teacher"]["batch_stats"]["m"], [5.0, 6.0])
  assert float(new["seen"]["n"]) == 3.0
  # An all-padding step leaves the teacher as it is.
  idle = method.update_local("train", local, active=jnp.bool_(False), **kwargs)
  np.testing.assert_allclose(idle["teacher"]["params"]["w"], [1.0, 2.0])
  np.testing.assert_allclose(idle["teacher"]["batch_stats"]["m"], [1.0, 1.0])


# Entropy pools ------------------------------------------------------------------------------------
def test_entropy_pools_by_hand():
  # Class 0 is annotated (ignored); class 1 is missing. entr(p) = −p·ln p, averaged over C = 2.
  probs = np.array([[0.9, 0.5], [0.1, 0.9], [0.3, 0.01], [0.7, math.exp(-1.0)]])
  entropy = missing_class_entropy(probs, np.array([True, False]))
  expect = np.array([0.5 * LN2, -0.9 * math.log(0.9), -0.01 * math.log(0.01), math.exp(-1.0)]) / 2
  np.testing.assert_allclose(entropy, expect, rtol=1e-12)  # 0.1733, 0.0474, 0.0230, 0.1839
  uncertain, confident = entropy_pools(entropy, 1, 2)
  # Highest: sample 3 (p = 1/e maximises −p ln p); lowest: sample 2 (p = 0.01), then 1 (p = 0.9).
  np.testing.assert_array_equal(uncertain, [False, False, False, True])
  np.testing.assert_array_equal(confident, [False, True, True, False])
  # No missing class: every entropy is 0; ties go to the lower index and the pools stay disjoint.
  flat = missing_class_entropy(probs, np.array([True, True]))
  np.testing.assert_array_equal(flat, 0.0)
  uncertain, confident = entropy_pools(flat, 1, 2)
  np.testing.assert_array_equal(uncertain, [True, False, False, False])
  np.testing.assert_array_equal(confident, [False, True, True, False])


def test_pool_sizes():
  assert pool_sizes(100, 0.05, 0.2) == (5, 20)
  assert pool_sizes(4, 0.05, 0.2) == (1, 1)  # at least one each
  assert pool_sizes(2, 0.9, 0.9) == (1, 1)  # one sample always stays out of the uncertain pool
  assert pool_sizes(1, 0.05, 0.2) == (0, 0) and pool_sizes(0, 0.05, 0.2) == (0, 0)


# Class-wise head aggregation ----------------------------------------------------------------------
def test_classwise_head_by_hand():
  kernels = jnp.array([[[1.0, 10.0, 100.0]], [[3.0, 30.0, 300.0]]])  # (K=2, D=1, C=3)
  biases = jnp.array([[0.4, -1.0, 2.0], [0.8, 1.0, 6.0]])
  positives = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
  kernel, bias = classwise_head_mean(kernels, biases, positives, jnp.array([1.0, 3.0]))
  # Class 0: weights 1/4, 3/4 → 0.25·1 + 0.75·3 = 2.5. Class 1: only client 0 has positives → 10.
  # Class 2: no positives anywhere → the fallback weights 1:3 → 0.25·100 + 0.75·300 = 250.
  np.testing.assert_allclose(kernel, [[2.5, 10.0, 250.0]], rtol=1e-6)
  np.testing.assert_allclose(bias, [0.7, -1.0, 5.0], rtol=1e-6)


def test_aggregate_body_by_samples_head_by_class():
  setup = hand_setup()
  method = FedLSM(setup.config, setup)
  stacked = {"params": {"conv": {"kernel": jnp.array([[0.0], [4.0], [9.0]])},
                        "head": {"kernel": jnp.array([[[1.0, 10.0]], [[3.0, 30.0]], [[7.0, 7.0]]]),
                                 "bias": jnp.array([[0.0, 1.0], [4.0, 3.0], [7.0, 7.0]])}},
             "batch_stats": {"m": jnp.array([1.0, 3.0, 9.0])}}
  clients = {"count": jnp.array([1, 3, 0], jnp.int32),  # client 2 is padding
             "per_client": {"class_positives": jnp.array([[2.0, 0.0], [2.0, 5.0], [0.0, 0.0]])}}
  got = method.aggregate(stacked, clients, None)
  # Body: sample-count weights 1/4, 3/4 (padding ignored).
  np.testing.assert_allclose(got["params"]["conv"]["kernel"], [3.0], rtol=1e-6)
  np.testing.assert_allclose(got["batch_stats"]["m"], 2.5, rtol=1e-6)
  # Head: class 0 by 2:2 positives → (1 + 3)/2 = 2; class 1 only client 1 → 30.
  np.testing.assert_allclose(got["params"]["head"]["kernel"], [[2.0, 30.0]], rtol=1e-6)
  np.testing.assert_allclose(got["params"]["head"]["bias"], [2.0, 3.0], rtol=1e-6)


# Host step ----------------------------------------------------------------------------------------
def hand_setup():
  """2 clients × 5 samples, 2 classes; client 0 annotates class 0 only, client 1 both. Sample 2 of
  client 0 has a hidden positive of class 1 (its missing class)."""
  clean = np.array([[1, 0], [0, 0], [0, 1], [1, 0], [0, 0],
                    [1, 1], [0, 1], [0, 0], [1, 0], [0, 0]], np.float32)
  annotated = np.array([[True, False], [True, True]])
  observed = clean * np.repeat(annotated, 5, axis=0)
  layout = ClientLayout.from_indices([np.arange(5), np.arange(5, 10)])
  config = base_config()
  config.method = "fedlsm"
  config.fedlsm.uncertain_fraction = 0.2  # 1 of 5
  config.fedlsm.confident_fraction = 0.4  # 2 of 5
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=observed, clean_labels=clean,
                        corrupted=np.zeros(10, bool), annotated=annotated)


def test_before_round_ranks_pools_and_counts_positives():
  setup = hand_setup()
  method = FedLSM(setup.config, setup)
  probs = np.array([[[0.9, 0.005], [0.2, 0.4], [0.1, 0.95], [0.8, 0.3], [0.1, 0.001]],
                    [[0.9, 0.9], [0.1, 0.9], [0.1, 0.2], [0.9, 0.1], [0.2, 0.1]]])
  ctx = RoundContext(round=0, global_vars=None, predict_train=lambda with_features=False: probs)
  state, changed, record = method.before_round(ctx, method.init_state())
  assert changed
  # Client 0, class 1 missing: entr = 0.0265, 0.3665, 0.0487, 0.3612, 0.0069 (×1/2): uncertain =
  # sample 1; confident = samples 4 and 0.
  np.testing.assert_array_equal(state["uncertain"][0], [False, True, False, False, False])
  np.testing.assert_array_equal(state["confident"][0], [True, False, False, False, True])
  # Client 1 annotates everything: all entropies 0 → the first slot, then the next two.
  np.testing.assert_array_equal(state["uncertain"][1], [True, False, False, False, False])
  np.testing.assert_array_equal(state["confident"][1], [False, True, True, False, False])
  # Positives over the main-loss samples: client 0: observed class 0 on samples 0 and 3 (2), one
  # pseudo-positive of class 1 (sample 2, p = 0.95); client 1: its observed labels minus slot 0.
  np.testing.assert_array_equal(state["class_positives"], [[2, 1], [1, 1]])
  # Pseudo-labels on client 0's 4 missing entries (samples 0, 2, 3, 4): confident on 0 (0.005 → 0),
  # 2 (0.95 → 1, truly positive) and 4 (0.001 → 0), all correct; sample 3 (0.3) stays soft.
  overall = record["pseudo_labels"]
  assert overall["missing_entries"] == 4 and overall["coverage"] == pytest.approx(0.75)
  assert overall["accuracy"] == 1.0 and overall["pseudo_positives"] == 1
  assert overall["positive_precision"] == 1.0 and overall["positive_recall"] == 1.0
  assert [(c["uncertain_pool"], c["confident_pool"]) for c in record["clients"]] == [(1, 2), (1, 2)]
  # The device arrays: observed targets, pool flags as 0/1, counts and the global pos_weight.
  per_sample, per_client = method.client_arrays(state)
  np.testing.assert_array_equal(per_sample["uncertain"][0], [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(per_client["class_positives"], [[2, 1], [1, 1]])
  np.testing.assert_allclose(per_client["pos_weight"], [[6 / 4, 8 / 2]] * 2)


# End to end ---------------------------------------------------------------------------------------
def test_train_and_evaluate_smoke(tmp_path):
  from fednml_jax import train
  # A rolled scan compiles the (teacher + strong view + mixup) step once instead of per step. The
  # thresholds are loosened so that an untrained teacher's outputs (≈ 0.5) give pseudo-labels.
  config = tiny_config(method="fedlsm", rounds=2,
                       **{"fedlsm.mixup_pairs": 2, "fl.scan_unroll": 1,
                          "fedlsm.pseudo_high": 0.5, "fedlsm.pseudo_low": 0.49})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["method"] == "fedlsm" and np.isfinite(summary["test_final"]["mAP"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  pools = [r for r in records if "pseudo_labels" in r]
  assert [r["round"] for r in pools] == [0, 1]
  assert len(pools[0]["clients"]) == config.fl.num_clients
  assert all(c["uncertain_pool"] >= 1 and c["confident_pool"] >= 1 for c in pools[0]["clients"])
  trainings = [r for r in records if "teacher_training" in r]
  assert [r["round"] for r in trainings] == [0, 1]
  training = trainings[0]["teacher_training"]
  assert len(training["clients"]) == config.fl.num_clients
  assert 0.5 < training["coverage"] <= 1.0
  assert pools[0]["pseudo_labels"]["coverage"] > 0.5
  losses = [r["client_loss"] for r in records if "client_loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
