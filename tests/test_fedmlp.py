"""Tests of fednml_jax.methods.fedmlp: prototypes, similarity, pseudo-label selection and both
stages' losses with numbers worked by hand, the host step on a hand-made federation, and one
2-round end-to-end run (stage 1, then stage 2)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError
from fednml_jax.losses import weighted_batch_mean
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.methods.fedmlp import (FedMLP, average_prototypes, client_prototypes,
                                       prototype_similarity, select_pseudo_labels, stage1_loss,
                                       supervised_entries_loss)
from fednml_jax.tasks import get_task

from conftest import tiny_config


def test_registered_with_defaults():
  assert METHODS["fedmlp"] is FedMLP and FedMLP.supported_tasks == ("multilabel",)
  c = base_config().fedmlp
  assert (c.stage1_rounds, c.negative_fraction, c.positive_fraction) == (50, 0.005, 0.01)


# Prototypes and similarity ------------------------------------------------------------------------
def test_client_prototypes_and_server_average_by_hand():
  features = np.array([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]],
                       [[4.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
  labels = np.array([[[1, 0], [0, 1], [1, 1]],
                     [[0, 1], [0, 0], [1, 1]]], np.float32)
  annotated = np.array([[True, True], [True, False]])
  valid = np.array([[True, True, True], [True, True, False]])  # client 1's slot 2 is padding
  means, counts = client_prototypes(features, labels, annotated, valid)
  # Client 0, class 0: label 0 = {1} → [0, 1]; label 1 = {0, 2} → ([1, 0] + [2, 2])/2 = [1.5, 1].
  #           class 1: label 0 = {0} → [1, 0]; label 1 = {1, 2} → [1, 1.5].
  np.testing.assert_allclose(means[0, 0], [[0, 1], [1, 0]])
  np.testing.assert_allclose(means[0, 1], [[1.5, 1], [1, 1.5]])
  np.testing.assert_array_equal(counts[0], [[1, 1], [2, 2]])
  # Client 1, class 0: label 0 = {0, 1} → [2, 2]; no positive (slot 2 is padding); class 1 is not
  # annotated: nothing.
  np.testing.assert_allclose(means[1, 0], [[2, 2], [0, 0]])
  np.testing.assert_allclose(means[1, 1], [[0, 0], [0, 0]])
  np.testing.assert_array_equal(counts[1], [[2, 0], [0, 0]])

  prototypes, present = average_prototypes(means, counts, annotated, weights=np.array([3, 2]))
  # Class 0, label 0: both clients annotate it, weights 3 and 2: (3·[0, 1] + 2·[2, 2])/5 =
  # [0.8, 1.4]. Label 1: client 1 has no positive → client 0 alone: [1.5, 1].
  # Class 1: only client 0 annotates it: [1, 0] and [1, 1.5].
  np.testing.assert_allclose(prototypes[0], [[0.8, 1.4], [1.0, 0.0]])
  np.testing.assert_allclose(prototypes[1], [[1.5, 1.0], [1.0, 1.5]])
  assert present.all()
  # A class nobody annotates has no prototype.
  _, none = average_prototypes(means, counts, np.array([[True, False], [True, False]]), [3, 2])
  np.testing.assert_array_equal(none, [[True, False], [True, False]])


def test_prototype_similarity_by_hand():
  # Class 0: P0 = [1, 0], P1 = [0, 1]; class 1: P0 = [1, 1], P1 = [−1, 1].
  prototypes = np.array([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [-1.0, 1.0]]])
  features = np.array([[3.0, 4.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
  sim = prototype_similarity(features, prototypes)
  r2 = math.sqrt(2)
  # [3, 4]: class 0: 3/5 − 4/5 = −0.2; class 1: 7/(5√2) − 1/(5√2) = 6/(5√2).
  # [1, 1]: class 0: 1/√2 − 1/√2 = 0;   class 1: 2/(√2·√2) − 0 = 1.
  # [2, 0]: class 0: 1 − 0 = 1;         class 1: 1/√2 − (−1/√2) = √2.
  # [0, 0]: zero norm → every cosine 0.
  np.testing.assert_allclose(sim, [[-0.2, 6 / (5 * r2)], [0.0, 1.0], [1.0, r2], [0.0, 0.0]],
                             atol=1e-12)
  assert sim.shape == (4, 2)
  # Leading axes are kept: (K, n, D) features → (K, n, C).
  assert prototype_similarity(features.reshape(2, 2, 2), prototypes).shape == (2, 2, 2)


def test_selection_is_cumulative_and_never_reselects():
  sim = np.array([0.9, -0.5, 0.3, -0.1, 0.9, -0.7, 0.2, -0.3])
  candidates = np.ones(8, bool)
  candidates[0] = False  # already pseudo-labelled in an earlier round
  # Candidates with sim ≥ 0: slots 2, 4, 6 → int(0.67·3) = 2 negatives: the highest, 4 and 2.
  # sim < 0: slots 1, 3, 5, 7 → int(0.5·4) = 2 positives: the lowest, 5 and 1. Slot 0 (0.9) is
  # not a candidate, so it is not chosen again.
  neg, pos = select_pseudo_labels(sim, candidates, 0.67, 0.5)
  np.testing.assert_array_equal(np.flatnonzero(neg), [2, 4])
  np.testing.assert_array_equal(np.flatnonzero(pos), [1, 5])
  # The next round: the remaining candidates 3, 6, 7: sim ≥ 0: {6} → int(0.67) = 0 negatives;
  # sim < 0: {3, 7} → int(0.5·2) = 1 positive: the lowest, 7 (−0.3).
  candidates &= ~neg & ~pos
  neg2, pos2 = select_pseudo_labels(sim, candidates, 0.67, 0.5)
  assert not neg2.any()
  np.testing.assert_array_equal(np.flatnonzero(pos2), [7])
  # The reference's fractions (0.5% / 1%) select nothing among so few samples (int() floors).
  neg3, pos3 = select_pseudo_labels(sim, np.ones(8, bool), 0.005, 0.01)
  assert not neg3.any() and not pos3.any()
  # Ties keep slot order.
  neg4, _ = select_pseudo_labels(np.array([0.5, 0.5, 0.5]), np.ones(3, bool), 0.67, 0.0)
  np.testing.assert_array_equal(np.flatnonzero(neg4), [0, 1])


# Losses -------------------------------------------------------------------------------------------
def test_stage1_loss_by_hand():
  targets = jnp.array([[1.0, 0.0]])
  class_mask = jnp.array([1.0, 0.0])  # class 0 annotated, class 1 missing
  ln3 = math.log(3.0)
  logits = [jnp.array([[0.0, ln3]]), jnp.array([[ln3, 0.0]])]
  teacher = [jnp.array([[7.0, 0.0]]), jnp.array([[-7.0, math.log(9.0)]])]
  # View 1: BCE(class 0, z = 0, y = 1) = ln 2; MSE(class 1) = (σ(ln 3) − σ(0))² = (0.75 − 0.5)².
  # View 2: BCE = −ln σ(ln 3) = −ln 0.75; MSE = (σ(0) − σ(ln 9))² = (0.5 − 0.9)² = 0.16.
  # Loss = (ln 2 − ln 0.75)/2 + (0.0625 + 0.16)/2; the teacher's class 0 is not used.
  expect = (math.log(2) - math.log(0.75)) / 2 + (0.0625 + 0.16) / 2
  got = stage1_loss(logits, teacher, targets, class_mask)
  assert got.shape == (1,)
  np.testing.assert_allclose(np.asarray(got), [expect], rtol=1e-6)
  assert expect == pytest.approx(0.6016646, abs=1e-6)
  # A client that annotates every class has no MSE term: BCE of both classes, averaged.
  # View 1: (ln 2 + ln 4)/2; view 2: (−ln 0.75 + ln 2)/2.
  full = stage1_loss(logits, teacher, targets, jnp.array([1.0, 1.0]))
  both = ((math.log(2) + math.log(4)) / 2 + (-math.log(0.75) + math.log(2)) / 2) / 2
  np.testing.assert_allclose(np.asarray(full), [both], rtol=1e-6)
  # The teacher receives no gradient.
  grad = jax.grad(lambda t: jnp.sum(stage1_loss(logits, [t, teacher[1]], targets, class_mask)))(
      teacher[0])
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_stage2_loss_is_the_mean_over_supervised_entries():
  ln3 = math.log(3.0)
  logits = jnp.array([[0.0, ln3], [ln3, 5.0], [0.0, 0.0]])
  targets = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
  mask = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
  weight = jnp.array([1.0, 1.0, 0.0])  # the last row is batch padding
  # Supervised entries: (0, 0): ln 2; (0, 1): target 0, σ = 0.75 → ln 4; (1, 0): −ln 0.75.
  per = supervised_entries_loss(logits, targets, mask, weight)
  got = float(weighted_batch_mean(per, weight))
  assert got == pytest.approx((math.log(2) + math.log(4) - math.log(0.75)) / 3, rel=1e-6)
  # (Not the mean of per-sample means, ((ln 2 + ln 4)/2 − ln 0.75)/2 = 0.6635.)
  assert got == pytest.approx(0.7890411, abs=1e-6)
  # No supervised entry: 0.
  empty = supervised_entries_loss(logits, targets, jnp.zeros_like(mask), weight)
  assert float(weighted_batch_mean(empty, weight)) == 0.0


# Host step on a hand-made federation --------------------------------------------------------------
def hand_setup(negative_fraction=0.5, positive_fraction=0.5):
  """2 clients × 4 samples, 2 classes, no noise; client 1 does not annotate class 1, whose true
  labels on its samples are 0, 1, 0, 0."""
  observed = np.array([[1, 0], [0, 0], [1, 1], [0, 1],
                       [1, 0], [1, 0], [0, 0], [0, 0]], np.float32)
  clean = observed.copy()
  clean[5, 1] = 1.0
  annotated = np.array([[True, True], [True, False]])
  layout = ClientLayout.from_indices([np.arange(4), np.arange(4, 8)])
  config = base_config()
  config.method = "fedmlp"
  config.fedmlp.stage1_rounds = 1
  config.fedmlp.negative_fraction = negative_fraction
  config.fedmlp.positive_fraction = positive_fraction
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=observed, clean_labels=clean,
                        corrupted=np.zeros(8, bool), annotated=annotated)


def test_host_step_on_a_hand_made_federation():
  setup = hand_setup()
  method = FedMLP(setup.config, setup)
  # Client 0's class-1 negatives sit at [1, 0] and positives at [0, 1]: P0 = [1, 0], P1 = [0, 1].
  # Client 1's sims for class 1: [1, 0] → 1; [0, 1] → −1; [3, 1] → (3 − 1)/√10 = 0.632;
  # [1, 2] → (1 − 2)/√5 = −0.447.
  features = np.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
                       [[1.0, 0.0], [0.0, 1.0], [3.0, 1.0], [1.0, 2.0]]])
  calls = []

  def predict_train(with_features=False):
    calls.append(with_features)
    return np.full((2, 4, 2), 0.5), features

  ctx = lambda r: RoundContext(round=r, global_vars=None, predict_train=predict_train)  # noqa: E731
  assert method.phase(0) == "stage1" and method.phase(1) == "stage2"
  state = method.init_state()
  same, changed, log = method.before_round(ctx(0), state)  # stage 1: nothing to do
  assert same is state and not changed and log == {} and not calls

  # Stage 2, first round: sim ≥ 0 on slots 0, 2 → int(0.5·2) = 1 negative: slot 0 (sim 1);
  # sim < 0 on slots 1, 3 → 1 positive: slot 1 (sim −1).
  new, changed, log = method.before_round(ctx(1), state)
  assert changed and calls == [True]
  np.testing.assert_array_equal(new["pseudo_negative"][1, :, 1], [True, False, False, False])
  np.testing.assert_array_equal(new["pseudo_positive"][1, :, 1], [False, True, False, False])
  assert not new["pseudo_negative"][0].any() and not new["pseudo_negative"][1, :, 0].any()
  assert not state["pseudo_negative"].any()  # the old state is not modified
  json.dumps(log)
  assert log["stage2_round"] == 0 and log["classes_without_prototypes"] == []
  assert log["added"]["negatives"] == 1 and log["added"]["positives"] == 1
  assert log["total"]["negative_accuracy"] == 1.0 and log["total"]["positive_accuracy"] == 1.0
  assert log["total"]["missing_entries"] == 4 and log["total"]["hidden_positives"] == 1
  assert log["prototype_cosine"][1] == pytest.approx(0.0)  # P0 ⟂ P1 for class 1
  assert [c["missing_classes"] for c in log["clients"]] == [[], [1]]

  # Stage 2, next round, more positives allowed: the remaining slots 2 (0.632), 3 (−0.447):
  # int(0.5·1) = 0 negatives, int(1.0·1) = 1 positive: slot 3. Slots 0, 1 are kept, not reselected.
  method.cfg.positive_fraction = 1.0
  newer, changed, log = method.before_round(ctx(2), new)
  assert changed
  np.testing.assert_array_equal(newer["pseudo_negative"][1, :, 1], [True, False, False, False])
  np.testing.assert_array_equal(newer["pseudo_positive"][1, :, 1], [False, True, False, True])
  assert (log["added"]["negatives"], log["added"]["positives"]) == (0, 1)
  assert log["added"]["positive_accuracy"] == 0.0  # slot 3's true label is 0
  total = log["total"]
  assert (total["negatives"], total["positives"]) == (1, 2)
  assert total["positive_accuracy"] == 0.5 and total["positive_recall"] == 1.0
  assert total["labelled_fraction"] == 0.75 and total["accuracy"] == pytest.approx(2 / 3)

  per_sample, per_client = method.client_arrays(newer)
  np.testing.assert_array_equal(per_client["class_mask"], [[1, 1], [1, 0]])
  np.testing.assert_array_equal(per_sample["supervised"][0], np.ones((4, 2)))
  np.testing.assert_array_equal(per_sample["supervised"][1], [[1, 1], [1, 1], [1, 0], [1, 1]])
  np.testing.assert_array_equal(per_sample["targets"][1], [[1, 0], [1, 1], [0, 0], [0, 1]])


@pytest.mark.parametrize("key, value", [("stage1_rounds", -1), ("negative_fraction", -0.1),
                                        ("positive_fraction", 1.5)])
def test_config_ranges(key, value):
  setup = hand_setup()
  setup.config.fedmlp[key] = value
  with pytest.raises(ConfigError, match=f"fedmlp.{key}"):
    FedMLP(setup.config, setup)


# End to end ---------------------------------------------------------------------------------------
def test_train_and_evaluate_smoke(tmp_path):
  from fednml_jax import train
  # Fractions large enough for ~50 samples per client to get pseudo-labels in one round; a rolled
  # scan compiles the two-view stage-1 program in half the time of the CPU default (unrolled).
  config = tiny_config(method="fedmlp", rounds=2, **{"fedmlp.stage1_rounds": 1,
                                                     "fedmlp.negative_fraction": 0.2,
                                                     "fedmlp.positive_fraction": 0.2,
                                                     "fl.scan_unroll": 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["method"] == "fedmlp" and np.isfinite(summary["test_final"]["mAP"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records if "phase" in r] == ["stage1", "stage2"]
  assert all(np.isfinite(r["client_loss"]).all() for r in records if "client_loss" in r)
  host = [r for r in records if r.get("kind") == "refinement"]
  assert [r["round"] for r in host] == [1]
  total = host[0]["total"]
  assert total["negatives"] > 0 and total["positives"] > 0
  assert total["negatives"] + total["positives"] < total["missing_entries"]
  assert len(host[0]["clients"]) == config.fl.num_clients
