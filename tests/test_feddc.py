"""Tests of fednml_jax.methods.feddc: LID, the proximal term, the detection, the noise estimate and
the relabelling with numbers worked by hand, the host steps on a hand-made federation, and one tiny
end-to-end run with shortened stages."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.methods.feddc import (FedDC, detect_noisy_clients_by_lid, estimate_noise_level,
                                      lid_mle, mixup_bce, noise_scaled_proximal,
                                      relabel_confident_entries, relabel_selection)
from fednml_jax.losses import masked_bce_with_logits
from fednml_jax.tasks import get_task

from conftest import tiny_config


def test_registered_with_reference_defaults():
  assert METHODS["feddc"] is FedDC and FedDC.supported_tasks == ("multilabel",)
  c = base_config().feddc
  assert (c.preprocess_rounds, c.finetune_rounds, c.beta, c.lid_k, c.relabel_ratio,
          c.confidence_thres, c.clean_set_thres, c.correction, c.mixup_alpha) == (
              5, 50, 5.0, 20, 0.5, 0.5, 0.1, True, 1.0)


# LID ----------------------------------------------------------------------------------------------
def test_lid_by_hand_in_one_dimension():
  # Points 0, 1, 3 and a padding slot (ignored however close it is); k = 2 neighbours each.
  points = jnp.array([[0.0], [1.0], [3.0], [0.5]])
  valid = jnp.array([True, True, True, False])
  # LID = −k / Σ_j log(d_j / d_k)   (eps = 1e-6 changes the 6th digit at most)
  # x = 0: d = 1, 3 → −2 / (ln ⅓ + ln 1) = 2/ln 3;  x = 1: d = 1, 2 → 2/ln 2;
  # x = 3: d = 2, 3 → −2 / ln ⅔ = 2/ln 1.5;  the padding slot: 0.
  expect = [2 / math.log(3), 2 / math.log(2), 2 / math.log(1.5), 0.0]
  np.testing.assert_allclose(np.asarray(lid_mle(points, valid, 2)), expect, rtol=1e-4)
  # k larger than the 2 other points: k becomes 2, the same numbers.
  np.testing.assert_allclose(np.asarray(lid_mle(points, valid, 5)), expect, rtol=1e-4)


def test_lid_by_hand_in_two_dimensions_and_duplicates():
  # a = (0, 0), b = (3, 4), c = (0, 1): |ab| = 5, |ac| = 1, |bc| = √18; k = 2.
  points = jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
  valid = jnp.ones(3, bool)
  got = np.asarray(lid_mle(points, valid, 2))
  bc = math.sqrt(18)
  expect = [2 / math.log(5), 2 / math.log(5 / bc), 2 / math.log(bc / 1)]
  np.testing.assert_allclose(got, expect, rtol=1e-4)
  # A duplicate point: its nearest neighbour is at distance 0 → log 0 → LID 0 (as the reference).
  dup = np.asarray(lid_mle(jnp.array([[0.0], [0.0], [2.0]]), jnp.ones(3, bool), 2))
  assert dup[0] == 0.0 and dup[1] == 0.0
  # A single valid point has no neighbour: LID 0.
  single = lid_mle(jnp.array([[0.0], [1.0]]), jnp.array([True, False]), 2)
  np.testing.assert_array_equal(np.asarray(single), [0.0, 0.0])


# Proximal term and mixup --------------------------------------------------------------------------
def test_noise_scaled_proximal_by_hand():
  params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([[2.0]])}
  global_params = {"w": jnp.array([1.0, 0.0]), "b": jnp.array([[0.0]])}
  # ‖w − g‖ = √(0 + 4 + 4) = 2√2; β·μ·‖·‖ = 5 · 0.3 · 2√2 = 4.2426407.
  got = noise_scaled_proximal(params, global_params, 0.3, 5.0)
  np.testing.assert_allclose(float(got), 5 * 0.3 * 2 * math.sqrt(2), rtol=1e-6)
  # Gradient β·μ·(w − g)/‖w − g‖: w → 1.5·(0, 2)/2√2 = (0, 1.0606602), b → 1.5·2/2√2.
  grads = jax.grad(noise_scaled_proximal)(params, global_params, 0.3, 5.0)
  np.testing.assert_allclose(np.asarray(grads["w"]), [0.0, 1.5 / math.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads["b"]), [[1.5 / math.sqrt(2)]], rtol=1e-6)
  # At w = w_global: value 0 and gradient 0 (not NaN).
  at_global = jax.grad(noise_scaled_proximal)(global_params, global_params, 0.3, 5.0)
  assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(at_global))


def test_penalty_uses_the_client_mu_in_preprocessing_only_after_each_epochs_first_batch():
  setup = hand_setup()
  method = FedDC(setup.config, setup)
  params = {"w": jnp.array([3.0, 4.0])}
  global_params = {"w": jnp.zeros(2)}
  client = {"mu": jnp.float32(0.4)}
  # β = 5 (default), μ = 0.4, ‖w‖ = 5 → 10.
  pre = method.penalty("preprocess", params=params, global_params=global_params, client=client,
                       scalars={}, epoch_step=jnp.int32(3))
  np.testing.assert_allclose(float(pre), 10.0, rtol=1e-6)
  # The reference skips the first batch of every local epoch (`if batch_idx > 0`).
  first = method.penalty("preprocess", params=params, global_params=global_params, client=client,
                         scalars={}, epoch_step=jnp.int32(0))
  assert float(first) == 0.0
  later = method.penalty("train", params=params, global_params=global_params, client=client,
                         scalars={}, epoch_step=jnp.int32(3))
  assert float(later) == 0.0
  clean = method.penalty("preprocess", params=params, global_params=global_params,
                         client={"mu": jnp.float32(0.0)}, scalars={}, epoch_step=jnp.int32(3))
  assert float(clean) == 0.0


def test_mixup_bce_by_hand():
  logits = jnp.array([[0.0], [0.0]])
  targets = jnp.array([[1.0], [0.0]])
  # σ(0) = ½: every entry's BCE is ln 2 whatever the target, so λ mixes ln 2 with ln 2.
  got = mixup_bce(logits, targets, jnp.array([1, 0]), 0.3, jnp.array([1.0]))
  np.testing.assert_allclose(np.asarray(got), [math.log(2)] * 2, rtol=1e-6)
  # Logit ln 3 (p = ¾) on sample 0: target 1 → ln(4/3), its partner's target 0 → ln 4.
  logits = jnp.array([[math.log(3)], [0.0]])
  got = mixup_bce(logits, targets, jnp.array([1, 0]), 0.25, jnp.array([1.0]))
  np.testing.assert_allclose(float(got[0]), 0.25 * math.log(4 / 3) + 0.75 * math.log(4),
                             rtol=1e-6)


# Detection, noise estimate, relabelling -----------------------------------------------------------
def test_noisy_clients_from_well_separated_lids():
  noisy, means, reason = detect_noisy_clients_by_lid([10.0, 10.5, 25.0, 9.8, 24.0], seed=0)
  np.testing.assert_array_equal(noisy, [False, False, True, False, True])
  assert reason is None and sorted(means) == pytest.approx([(10.0 + 10.5 + 9.8) / 3, 24.5],
                                                           rel=1e-3)
  for degenerate in ([3.0], [2.0, 2.0, 2.0], [1.0, np.nan, 2.0]):
    noisy, means, reason = detect_noisy_clients_by_lid(degenerate, seed=0)
    assert not noisy.any() and means is None and reason is not None


def test_estimated_noise_level_and_relabel_selection_by_hand():
  losses = np.array([0.10, 0.12, 0.11, 2.0, 2.1, 0.09, 0.13, 0.10, 1.9, 0.11])
  level, flagged, reason = estimate_noise_level(losses, seed=0)
  # The high-loss component holds samples 3, 4 and 8: level 3/10.
  assert reason is None and level == pytest.approx(0.3)
  np.testing.assert_array_equal(np.flatnonzero(flagged), [3, 4, 8])
  # int(10 · 0.3 · 0.5) = int(1.5) = 1 sample: the highest loss, sample 4.
  np.testing.assert_array_equal(np.flatnonzero(relabel_selection(losses, level, 0.5)), [4])
  # ratio 1: int(3.0) = 3: samples 4, 3, 8.
  np.testing.assert_array_equal(np.flatnonzero(relabel_selection(losses, level, 1.0)), [3, 4, 8])
  # Ties go to the earlier slot: losses 1, 2, 2, 0, int(4 · 0.25 · 1) = 1 → slot 1.
  np.testing.assert_array_equal(np.flatnonzero(relabel_selection([1, 2, 2, 0], 0.25, 1.0)), [1])
  assert not relabel_selection(losses, 0.0, 0.5).any()
  level, flagged, reason = estimate_noise_level([0.5, 0.5, 0.5], seed=0)
  assert level == 0.0 and not flagged.any() and "identical" in reason


def test_relabel_confident_entries_by_hand():
  targets = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
  probs = np.array([[0.35, 0.95, 0.6], [0.9, 0.05, 0.05]])
  rows = np.array([True, False])
  annotated = np.array([True, True, False])
  # Threshold 0.5: row 0's annotated entries take 1[p > ½]: class 0 → 0 (max(0.35, 0.65) > ½),
  # class 1 → 1; class 2 is not annotated and keeps 0 although p = 0.6. Row 1 is not selected.
  new, written = relabel_confident_entries(targets, probs, rows, annotated, 0.5)
  np.testing.assert_array_equal(new, [[0, 1, 0], [0, 1, 0]])
  np.testing.assert_array_equal(written, [[True, True, False], [False, False, False]])
  # Threshold 0.7: class 0 (confidence 0.65) keeps its label 1; class 1 (0.95) is written.
  new, written = relabel_confident_entries(targets, probs, rows, annotated, 0.7)
  np.testing.assert_array_equal(new, [[1, 1, 0], [0, 1, 0]])
  np.testing.assert_array_equal(written, [[False, True, False], [False, False, False]])
  # A probability of exactly ½ is never confident.
  new, written = relabel_confident_entries(targets, np.full((2, 3), 0.5), np.ones(2, bool),
                                           annotated, 0.5)
  np.testing.assert_array_equal(new, targets)
  assert not written.any()


# Host steps on a hand-made federation -------------------------------------------------------------
def hand_setup(*, pad_clients_to=1, preprocess_rounds=1, finetune_rounds=1, rounds=5):
  """4 clients × 10 samples, 2 classes; clients 2 and 3 have their first 5 samples corrupted
  (flipped); client 1 annotates class 0 only, the others both classes."""
  rng = np.random.default_rng(0)
  n, num_classes = 40, 2
  clean = (rng.random((n, num_classes)) < 0.4).astype(np.float32)
  corrupted = np.zeros(n, bool)
  corrupted[20:25] = corrupted[30:35] = True
  noisy = np.where(corrupted[:, None], 1.0 - clean, clean).astype(np.float32)
  annotated = np.ones((4, num_classes), bool)
  annotated[1, 1] = False
  observed = noisy * np.repeat(annotated, 10, axis=0)
  layout = ClientLayout.from_indices([np.arange(10 * k, 10 * k + 10) for k in range(4)],
                                     pad_clients_to=pad_clients_to)
  config = base_config()
  config.method = "feddc"
  config.rounds = rounds
  config.feddc.preprocess_rounds = preprocess_rounds
  config.feddc.finetune_rounds = finetune_rounds
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=noisy, clean_labels=clean,
                        corrupted=corrupted, annotated=layout.pad_clients(annotated, False))


def test_detection_relabelling_and_stages_on_a_hand_made_federation():
  setup = hand_setup(pad_clients_to=5)  # 4 real clients + 1 padding client
  method = FedDC(setup.config, setup)
  assert [method.stage(r) for r in range(4)] == ["preprocess", "finetune", "usual", "usual"]
  assert [method.phase(r) for r in range(3)] == ["preprocess", "train", "train"]
  state = method.init_state()
  per_sample, per_client = method.client_arrays(state)
  assert per_sample["targets"].shape == (5, 10, 2)
  np.testing.assert_array_equal(per_client["mu"], np.zeros(5))
  np.testing.assert_array_equal(per_client["aggregate_mask"], np.ones(5))

  # Round 0's local models: clients 2 and 3 have high LIDs; their corrupted samples 0–4 high losses.
  lid = np.array([10.0, 10.5, 20.0, 21.0, 0.0])[:, None] * np.ones((5, 10))
  lid[0, 0] = 11.0  # client 0's mean LID: 10.1
  loss = np.full((5, 10), 0.1) + 0.01 * np.arange(10)
  loss[2:4, :5] = 2.0 + 0.1 * np.arange(5)
  measured, changed, log = method.after_round(0, state, {"lid": lid, "loss": loss})
  assert not changed and log == {}  # the detection and its record come in the next before_round
  np.testing.assert_allclose(measured["lid_round"], [10.1, 10.5, 20.0, 21.0, 0.0])
  np.testing.assert_allclose(measured["lid_accumulated"], [10.1, 10.5, 20.0, 21.0, 0.0])
  np.testing.assert_allclose(measured["sample_loss"][:4], loss[:4], rtol=1e-6)
  assert not measured["sample_loss"][4].any()  # the padding client's slots are all padding
  # The accumulated LID adds up over pre-processing rounds.
  again, _, _ = method.after_round(0, measured, {"lid": lid, "loss": loss})
  np.testing.assert_allclose(again["lid_accumulated"][:4], [20.2, 21.0, 40.0, 42.0])
  # Rounds after pre-processing do nothing on the host.
  assert method.after_round(1, measured, {}) == (measured, False, {})

  # Round 1 starts: detection, relabelling with the global model (which predicts the clean
  # labels), and the fine-tuning clean set (levels <= 0.1: clients 0 and 1).
  probs = setup.layout.gather(np.where(setup.clean_labels > 0, 0.9, 0.1))
  calls = []

  def predict_train():
    calls.append(1)
    return probs

  ctx = lambda r: RoundContext(round=r, global_vars=None, predict_train=predict_train)  # noqa: E731
  relabelled, changed, log = method.before_round(ctx(1), measured)
  assert changed and calls == [1] and log["stage"] == "finetune"
  json.dumps(log)
  det = log["detection"]
  assert det["measured_round"] == 0
  assert det["noisy_clients"] == [2, 3] and det["clean_clients"] == [0, 1]
  np.testing.assert_array_equal(relabelled["noisy"], [False, False, True, True, False])
  np.testing.assert_allclose(relabelled["noise_level"], [0, 0, 0.5, 0.5, 0])  # 5 of 10 flagged
  assert [c["corruption_rate"] for c in det["clients"]] == [0.0, 0.0, 0.5, 0.5]
  assert [c["lid"] for c in det["clients"]] == pytest.approx([10.1, 10.5, 20.0, 21.0])
  assert det["clients"][2]["flagged_precision"] == det["clients"][2]["flagged_recall"] == 1.0
  assert det["noise_level_mean_abs_error"] == 0.0
  np.testing.assert_allclose(method.client_arrays(relabelled)[1]["mu"], [0, 0, 0.5, 0.5, 0])
  # int(10 · 0.5 · 0.5) = 2 samples per noisy client: slots 4 and 3 (losses 2.4, 2.3), both
  # corrupted; their annotated entries become the clean labels.
  rel = log["relabel"]
  assert rel["kind"] == "preprocess" and rel["selected_samples"] == 4
  assert rel["selected_corrupted_rate"] == 1.0 and rel["written_entries"] == 8
  assert rel["changed_entries"] == 8 and rel["changed_correct_rate"] == 1.0
  # 20 samples × 2 classes, 10 corrupted samples (20 flipped entries) → 4 of them fixed.
  assert rel["label_acc_before"] == 0.5 and rel["label_acc_after"] == pytest.approx(0.7)
  clean_slots = setup.layout.gather(setup.clean_labels)
  np.testing.assert_array_equal(relabelled["targets"][2:4, 3:5], clean_slots[2:4, 3:5])
  np.testing.assert_array_equal(relabelled["targets"][2:4, :3], state["targets"][2:4, :3])
  np.testing.assert_array_equal(relabelled["targets"][:2], state["targets"][:2])
  assert log["finetune_clients"] == [0, 1]
  np.testing.assert_array_equal(relabelled["aggregate_mask"], [1, 1, 0, 0, 0])

  # Round 2 (fine-tuning over): every sample of the noisy clients is relabelled; all aggregate.
  final, changed, log = method.before_round(ctx(2), relabelled)
  assert changed and log["stage"] == "usual" and log["relabel"]["kind"] == "finetune_end"
  assert log["relabel"]["label_acc_after"] == 1.0
  np.testing.assert_array_equal(final["targets"][2:4], clean_slots[2:4])
  np.testing.assert_array_equal(final["aggregate_mask"], np.ones(5))
  # Nothing happens afterwards.
  assert method.before_round(ctx(3), final) == (final, False, {})
  assert len(calls) == 2


def test_degenerate_lids_flag_nobody():
  setup = hand_setup()
  method = FedDC(setup.config, setup)
  new, changed, log = method.before_round(
      RoundContext(round=1, global_vars=None, predict_train=None), method.init_state())
  # All accumulated LIDs 0: no client is noisy, nothing to relabel (and no device pass); every
  # client has level 0 and enters fine-tuning.
  assert changed and log["relabel"]["clients"] == [] and not new["noisy"].any()
  assert "identical" in log["detection"]["lid_gmm_reason"]
  assert log["finetune_clients"] == [0, 1, 2, 3] and log["finetune_reason"] is None


def test_empty_clean_set_aggregates_everyone():
  # No pre-processing: fine-tuning starts at round 0 with levels set by hand, all above 0.1.
  setup = hand_setup(preprocess_rounds=0)
  method = FedDC(setup.config, setup)
  state = dict(method.init_state(), noise_level=np.array([0.2, 0.3, 0.4, 0.5]))
  new, changed, log = method.before_round(
      RoundContext(round=0, global_vars=None, predict_train=None), state)
  assert changed and "detection" not in log and "relabel" not in log
  assert log["finetune_clients"] == [0, 1, 2, 3] and "every client" in log["finetune_reason"]
  np.testing.assert_array_equal(new["aggregate_mask"], np.ones(4))


def test_aggregation_leaves_out_masked_clients():
  setup = hand_setup()
  method = FedDC(setup.config, setup)
  stacked = {"params": {"w": jnp.array([0.0, 2.0, 4.0, 6.0])},
             "batch_stats": {"m": jnp.array([1.0, 3.0, 5.0, 7.0])}}
  clients = {"count": jnp.array([1, 3, 2, 2], jnp.int32),
             "per_client": {"aggregate_mask": jnp.array([1.0, 1.0, 0.0, 0.0])}}
  # Sample-count weights 1 and 3 on clients 0 and 1: (0·1 + 2·3)/4 = 1.5, (1 + 9)/4 = 2.5.
  got = method.aggregate(stacked, clients, None)
  np.testing.assert_allclose(float(got["params"]["w"]), 1.5, rtol=1e-6)
  np.testing.assert_allclose(float(got["batch_stats"]["m"]), 2.5, rtol=1e-6)


@pytest.mark.parametrize("key, value", [("preprocess_rounds", -1), ("finetune_rounds", -2),
                                        ("beta", -1.0), ("lid_k", 0), ("relabel_ratio", 1.5),
                                        ("confidence_thres", 1.0), ("clean_set_thres", -0.1),
                                        ("mixup_alpha", -1.0)])
def test_config_ranges(key, value):
  setup = hand_setup()
  setup.config.feddc[key] = value
  with pytest.raises(ConfigError, match=f"feddc.{key}"):
    FedDC(setup.config, setup)


# End to end ---------------------------------------------------------------------------------------
def test_local_output_gives_per_slot_lid_and_loss():
  """The device side of pre-processing on one client, with a stand-in frame."""
  setup = hand_setup()
  method = FedDC(setup.config, setup)
  logits = jnp.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [9.0, 9.0]])
  targets = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
  valid = jnp.array([True, True, True, False])

  class Frame:
    per_sample = {"valid": valid, "targets": targets}
    client = {"class_mask": jnp.array([1.0, 0.0])}

    def predict_all(self, variables, view, key):
      assert view == "weak"
      return logits, None

  out = method.local_output("preprocess", {}, frame=Frame(), key=jax.random.PRNGKey(0),
                            variables=None)
  expect_loss = np.where(np.asarray(valid), np.asarray(
      masked_bce_with_logits(logits, targets, jnp.array([1.0, 0.0]))), 0.0)
  np.testing.assert_allclose(np.asarray(out["loss"]), expect_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["lid"]),
                             np.asarray(lid_mle(jax.nn.sigmoid(logits), valid, 20)), rtol=1e-6)
  assert float(out["lid"][3]) == 0.0 and float(out["loss"][3]) == 0.0
  assert method.local_output("train", {}, frame=Frame(), variables=None, key=None) == {}


def test_train_and_evaluate_smoke(tmp_path):
  from fednml_jax import train
  config = tiny_config(method="feddc", rounds=2, **{"feddc.preprocess_rounds": 1,
                                                    "feddc.finetune_rounds": 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["method"] == "feddc" and np.isfinite(summary["test_final"]["mAP"])
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records if "phase" in r] == ["preprocess", "train"]
  detections = [r for r in records if "detection" in r]
  assert len(detections) == 1 and detections[0]["round"] == 1
  det = detections[0]["detection"]
  assert det["measured_round"] == 0
  assert len(det["clients"]) == config.fl.num_clients
  assert all(np.isfinite(c["lid"]) and c["lid"] > 0 for c in det["clients"])
  assert sorted(det["noisy_clients"] + det["clean_clients"]) == list(range(config.fl.num_clients))
  relabels = [r for r in records if "relabel" in r]
  assert relabels == detections and relabels[0]["stage"] == "finetune"
  assert relabels[0]["relabel"]["kind"] == "preprocess"
  assert [c["client"] for c in relabels[0]["relabel"]["clients"]] == det["noisy_clients"]
  assert relabels[0]["finetune_clients"]
