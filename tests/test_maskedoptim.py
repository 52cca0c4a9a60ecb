"""Tests of fednml_jax.methods.maskedoptim (MaskedOptim and FedELC): the loss, the valid mask, the
label-logit steps and the merge + geometric median with numbers worked by hand, the host steps on
a hand-made federation, and a 2-round run of each method on the embedded data; the same for the
single-label (softmax, published) form: its loss and 10 × mean rule by hand, its diagnostics, and
a 2-round run of each method on the embedded digits."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax import aggregation, train
from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError
from fednml_jax.losses import weighted_batch_mean
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.methods.maskedoptim import (FedELC, MaskedOptim, bernoulli_entropy, bernoulli_kl,
                                            label_correction_loss,
                                            label_correction_loss_single_label, lowest_loss_mask,
                                            merged_label_logits, merged_label_logits_single_label)
from fednml_jax.tasks import get_task

from conftest import interrupt_then_resume, tiny_config

LN2 = math.log(2.0)
LN3 = math.log(3.0)
H_QUARTER = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of Bern(0.25) = 0.562335


def softplus(x):
  return math.log1p(math.exp(x))


def test_registered_with_defaults():
  assert METHODS["maskedoptim"] is MaskedOptim and METHODS["fedelc"] is FedELC
  c = base_config()
  m = c.maskedoptim
  assert (m.warmup_rounds, m.label_lr, m.label_scale, m.compatibility_weight, m.entropy_weight,
          m.valid_fraction, m.global_weight, m.tau, m.gmm_seeds) == (
              30, 1000.0, 10.0, 0.5, 0.1, 0.8, 0.2, 1.0, 9)
  f = c.fedelc
  assert (f.warmup_rounds, f.label_lr, f.label_scale, f.compatibility_weight, f.entropy_weight,
          f.tau, f.gmm_seeds) == (20, 1000.0, 10.0, 0.5, 0.2, 1.0, 9)
  assert "valid_fraction" not in f and "global_weight" not in f
  assert MaskedOptim.supported_tasks == ("multilabel", "singlelabel") == FedELC.supported_tasks


# Losses -------------------------------------------------------------------------------------------
def test_bernoulli_terms_by_hand():
  # KL(Bern(0.5) ‖ Bern(0.75)) = 0.5·ln(0.5/0.75) + 0.5·ln(0.5/0.25) = 0.5·ln(4/3) = 0.143841.
  kl = bernoulli_kl(jnp.array([0.0, LN3, -LN3]), jnp.array([LN3, LN3, 0.0]))
  np.testing.assert_allclose(kl, [0.5 * math.log(4 / 3), 0.0, LN2 - H_QUARTER], atol=1e-6)
  np.testing.assert_allclose(bernoulli_entropy(jnp.array([0.0, LN3, -LN3])),
                             [LN2, H_QUARTER, H_QUARTER], atol=1e-6)


def _hand_batch():
  """Six samples, two classes; class 1 is not annotated (its values must not matter); sample 5 is
  padding. Supervised BCE on class 0: ln2, −ln0.75, −ln0.9, −ln0.25, −ln0.2 (largest), 0.0067."""
  z0 = jnp.array([0.0, LN3, math.log(9.0), -LN3, math.log(4.0), 5.0])
  l0 = jnp.array([0.0, LN3, 0.0, 10.0, 0.0, 0.0])
  y0 = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
  other = jnp.array([7.0, -3.0, 2.0, 0.5, -8.0, 1.0])
  logits = jnp.stack([z0, other], axis=1)
  label_logits = jnp.stack([l0, -other], axis=1)
  targets = jnp.stack([y0, jnp.ones(6)], axis=1)
  return logits, label_logits, targets, jnp.array([1.0, 0.0]), jnp.array([1, 1, 1, 1, 1, 0.0])


def test_valid_mask_keeps_the_lowest_80_percent_of_real_samples():
  logits, _, targets, class_mask, weight = _hand_batch()
  supervised = jnp.array([LN2, -math.log(0.75), -math.log(0.9), -math.log(0.25),
                          -math.log(0.2), 0.0067])
  # 5 real samples → int(0.8·5) = 4 kept: all but sample 4 (the largest loss); the padding
  # sample 5 has the lowest loss but is never ranked.
  np.testing.assert_array_equal(lowest_loss_mask(supervised, weight, 0.8), [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(lowest_loss_mask(supervised, weight, 1.0), [1, 1, 1, 1, 1, 0])
  # 0.7 of 10 samples is 7 (float32 0.7·10 would floor to 6); ties go to the earlier position.
  np.testing.assert_array_equal(lowest_loss_mask(jnp.zeros(10), jnp.ones(10), 0.7),
                                [1] * 7 + [0] * 3)


def test_label_correction_loss_by_hand():
  logits, label_logits, targets, class_mask, weight = _hand_batch()
  p = [0.5, 0.75, 0.9, 0.25, 0.8]

  def entropy(q):
    return -(q * math.log(q) + (1 - q) * math.log(1 - q))

  def kl(q, label_logit):  # KL(Bern(q) ‖ Bern(σ(l))) = BCE(l, q) − H(q)
    return q * softplus(-label_logit) + (1 - q) * softplus(label_logit) - entropy(q)

  l0 = [0.0, LN3, 0.0, 10.0, 0.0]
  y0 = [1, 1, 1, 1, 0]
  compat = [softplus(-l) if y else softplus(l) for l, y in zip(l0, y0)]  # BCE(l, y)
  # Sample by sample: KL + 0.5·mask·L_o + 0.1·H, only class 0 (the annotated one).
  # e.g. sample 0: 0 + 0.5·ln2 + 0.1·ln2; sample 1: 0 + 0.5·(−ln 0.75) + 0.1·0.562335.
  for valid_fraction, mask in ((0.8, [1, 1, 1, 1, 0]), (1.0, [1, 1, 1, 1, 1])):
    expect = [kl(p[i], l0[i]) + 0.5 * mask[i] * compat[i] + 0.1 * entropy(p[i]) for i in range(5)]
    got = label_correction_loss(logits, label_logits, targets, class_mask, weight,
                                compatibility_weight=0.5, entropy_weight=0.1,
                                valid_fraction=valid_fraction)
    np.testing.assert_allclose(got[:5], expect, rtol=1e-5, atol=1e-6)
  assert expect[0] == pytest.approx(0.6 * LN2)
  # The label logits' gradient of the batch mean (what the engine differentiates): for a sample,
  # (1/n)·[(σ(l) − p) + α·mask·(σ(l) − y)] / (annotated classes); sample 1: σ(l) = p = y − 0.25.
  grads = jax.grad(lambda ll: weighted_batch_mean(
      label_correction_loss(logits, ll, targets, class_mask, weight), weight))(label_logits)
  np.testing.assert_allclose(grads[:, 0], [(0.5 - 0.5 + 0.5 * (0.5 - 1)) / 5,
                                           (0.5 * (0.75 - 1)) / 5,
                                           (0.5 - 0.9 + 0.5 * (0.5 - 1)) / 5,
                                           (jax.nn.sigmoid(10.0) - 0.25
                                            + 0.5 * (jax.nn.sigmoid(10.0) - 1)) / 5,
                                           (0.5 - 0.8) / 5, 0.0], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grads[:, 1], 0.0)  # missing class: its label logits never move


# Local state: the epoch's label step and the 10 × mean rule ---------------------------------------
def hand_setup(*, num_real=4, pad_clients_to=1, **overrides):
  """4 clients × 4 samples × 2 classes; clients 2 and 3 have 2 corrupted samples each (both
  classes flipped); client 1 annotates class 0 only (its class-1 positives read as 0)."""
  n = 4
  clean = np.tile(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32), (num_real, 1))
  corrupted = np.zeros(num_real * n, bool)
  for k in (2, 3):
    if k < num_real:
      corrupted[k * n:k * n + 2] = True
  noisy = np.where(corrupted[:, None], 1.0 - clean, clean).astype(np.float32)
  annotated = np.ones((num_real, 2), bool)
  if num_real > 1:
    annotated[1, 1] = False
  observed = noisy * np.repeat(annotated, n, axis=0)
  layout = ClientLayout.from_indices([np.arange(k * n, (k + 1) * n) for k in range(num_real)],
                                     pad_clients_to=pad_clients_to)
  config = base_config()
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=noisy, clean_labels=clean,
                        corrupted=corrupted, annotated=layout.pad_clients(annotated, False))


def test_label_logits_step_once_per_epoch_by_minus_lambda_times_the_summed_gradient():
  method = MaskedOptim(base_config(), hand_setup())
  frame = types.SimpleNamespace(batch_size=2)
  l0 = jnp.array([[10.0, -10.0], [-10.0, 10.0], [10.0, 10.0]])
  local = {"trainable": l0, "grad_sum": jnp.zeros((3, 2))}
  g1 = jnp.array([[0.001, 0.0], [0.0, -0.002], [0.0, 0.0]])
  g2 = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.004, -0.006]])
  step = lambda local, grads, weight, end: method.update_local(  # noqa: E731
      "correct", local, frame=frame, grads=grads, aux={}, slot=None, weight=weight, active=True,
      epoch_end=jnp.bool_(end), params=None, batch_stats=None)
  # A full batch of 2: the labels do not move within the epoch, the gradient is summed.
  local = step(local, g1, jnp.array([1.0, 1.0]), False)
  np.testing.assert_array_equal(local["trainable"], l0)
  np.testing.assert_allclose(local["grad_sum"], g1)
  # The epoch's last batch holds 1 real sample: its gradient (a mean over 1) is scaled to the 1/B
  # of a full batch, ×1/2. Then l ← l − 1000·Σ: row 0: 10 − 1 = 9; row 1: 10 + 2 = 12;
  # row 2: 10 − 1000·0.002 = 8 and 10 + 1000·0.003 = 13.
  local = step(local, g2, jnp.array([1.0, 0.0]), True)
  np.testing.assert_allclose(local["trainable"], [[9.0, -10.0], [-10.0, 12.0], [8.0, 13.0]],
                             atol=1e-5)
  np.testing.assert_array_equal(local["grad_sum"], 0.0)
  assert method.update_local("warmup", {}, frame=frame, grads={}, aux={}, slot=None,
                             weight=None, active=True, epoch_end=True, params=None,
                             batch_stats=None) == {}


def test_ten_times_mean_rule_on_bernoulli_labels():
  # 10·(σ(l) + p − 1) = 10·(2q − 1), q = (σ(l) + p)/2: the two-way softmax of the reference.
  got = merged_label_logits(jnp.array([10.0, -10.0, 0.0, 0.0]),
                            jnp.array([0.0, LN3, -LN3, 0.0]))
  s10 = 1.0 / (1.0 + math.exp(-10.0))
  np.testing.assert_allclose(got, [10 * (s10 - 0.5), 10 * (1 - s10 - 0.25), -2.5, 0.0],
                             rtol=1e-6)
  # In `local_output`: only a noisy client's annotated classes follow the rule.
  method = MaskedOptim(base_config(), hand_setup())
  learned = jnp.array([[10.0, -10.0], [0.0, 4.0]])
  local_logits = jnp.array([[0.0, 3.0], [LN3, -2.0]])

  def frame(noisy, class_mask):
    return types.SimpleNamespace(
        client={"noisy": jnp.float32(noisy), "class_mask": jnp.array(class_mask)},
        predict_all=lambda variables, view, key: (local_logits, None))

  out = method.local_output("correct", {"trainable": learned},
                            frame=frame(1.0, [1.0, 0.0]), variables=None, key=None)
  np.testing.assert_allclose(out["label_logits"], [[10 * (s10 - 0.5), -10.0], [2.5, 4.0]],
                             rtol=1e-6)
  np.testing.assert_array_equal(out["learned_logits"], learned)
  clean = method.local_output("correct", {"trainable": learned},
                              frame=frame(0.0, [1.0, 1.0]), variables=None, key=None)
  np.testing.assert_array_equal(clean["label_logits"], learned)


# Aggregation --------------------------------------------------------------------------------------
def test_merge_then_geometric_median_of_three_points():
  method = MaskedOptim(base_config(), hand_setup(num_real=3))
  # Client 0 is noisy: 0.2·(3, 0) + 0.8·(−2, 0) = (−1, 0). The median of (−1, 0), (1, 0), (0, 3)
  # is the Fermat point, where each side is seen at 120°: (0, 1/√3) = (0, 0.57735).
  stacked = {"params": {"w": jnp.array([[-2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])},
             "batch_stats": {"m": jnp.array([-0.25, 2.0, 3.0])}}
  global_vars = {"params": {"w": jnp.array([3.0, 0.0])}, "batch_stats": {"m": jnp.array(6.0)}}
  clients = {"count": jnp.array([4, 4, 4]),
             "per_client": {"noisy": jnp.array([1.0, 0.0, 0.0]), "detected": jnp.ones(3)}}
  got = method.aggregate(stacked, clients, global_vars)
  np.testing.assert_allclose(got["params"]["w"], [0.0, 1 / math.sqrt(3)], atol=1e-4)
  # Every tensor is merged: 0.2·6 + 0.8·(−0.25) = 1; the median of 1, 2, 3 is 2 (= the mean).
  np.testing.assert_allclose(got["batch_stats"]["m"], 2.0, atol=1e-6)
  # Before detection nobody is noisy: the plain geometric median of the unmerged points.
  clients["per_client"] = {"noisy": jnp.zeros(3), "detected": jnp.zeros(3)}
  plain = method.aggregate(stacked, clients, global_vars)
  expect = aggregation.geometric_median(stacked, jnp.ones(3))
  np.testing.assert_allclose(plain["params"]["w"], expect["params"]["w"], rtol=1e-6)
  assert abs(float(plain["params"]["w"][0])) > 0.1  # differs from the merged case


def test_fedelc_aggregates_with_mean_then_daagg_and_never_merges():
  setup = hand_setup(**{"fl.client_weighting": "uniform"})
  method = FedELC(setup.config, setup)
  stacked = {"params": {"w": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0], [3.0, 3.0]])},
             "batch_stats": {"m": jnp.array([1.0, 2.0, 3.0, 4.0])}}
  count = jnp.array([1, 1, 2, 4], jnp.int32)
  noisy = jnp.array([0.0, 0.0, 1.0, 1.0])
  before = {"count": count, "per_client": {"noisy": noisy, "detected": jnp.zeros(4)}}
  got = method.aggregate(stacked, before, {"params": {"w": jnp.zeros(2)}})
  np.testing.assert_allclose(got["params"]["w"], [1.0, 1.75], rtol=1e-6)  # uniform mean
  after = {"count": count, "per_client": {"noisy": noisy, "detected": jnp.ones(4)}}
  got = method.aggregate(stacked, after, {"params": {"w": jnp.full(2, 100.0)}})
  expect = aggregation.daagg(stacked, count.astype(jnp.float32), noisy > 0)
  np.testing.assert_allclose(got["params"]["w"], expect["params"]["w"], rtol=1e-6)


# Host steps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,key,value", [
    (MaskedOptim, "warmup_rounds", -1), (MaskedOptim, "label_lr", -1.0),
    (MaskedOptim, "label_scale", 0.0), (MaskedOptim, "valid_fraction", 1.5),
    (MaskedOptim, "global_weight", -0.1), (MaskedOptim, "gmm_seeds", 0),
    (FedELC, "compatibility_weight", -1.0), (FedELC, "entropy_weight", float("nan"))])
def test_config_ranges(cls, key, value):
  setup = hand_setup(**{f"{cls.name}.{key}": value})
  with pytest.raises(ConfigError, match=f"{cls.name}.{key}"):
    cls(setup.config, setup)


def test_detection_then_label_logits_written_back_with_diagnostics():
  setup = hand_setup(pad_clients_to=5, **{"maskedoptim.warmup_rounds": 2})
  method = MaskedOptim(setup.config, setup)
  state = method.init_state()
  per_sample, per_client = method.client_arrays(state)
  # ±10 at the observed labels; client 1 does not annotate class 1, which reads as −10.
  np.testing.assert_array_equal(per_sample["label_logits"][0], [[10, -10], [-10, 10], [10, 10],
                                                                [-10, -10]])
  np.testing.assert_array_equal(per_sample["label_logits"][1, :, 1], -10.0)
  np.testing.assert_array_equal(per_client["noisy"], np.zeros(5))
  assert method.phase(1) == "warmup" and method.phase(2) == "correct"
  # A global model that predicts the clean labels: clients 2 and 3 have the high losses.
  jitter = np.random.default_rng(1).uniform(-0.05, 0.05, (5, 4, 2))
  probs = setup.layout.gather(np.where(setup.clean_labels > 0, 0.85, 0.15)) + jitter
  ctx = lambda r: RoundContext(round=r, global_vars=None, predict_train=lambda: probs)  # noqa: E731
  same, changed, log = method.before_round(ctx(1), state)
  assert same is state and not changed and log == {}
  new, changed, log = method.before_round(ctx(2), state)
  assert changed and int(new["detected"]) == 1
  np.testing.assert_array_equal(new["noisy"], [False, False, True, True, False])
  det = log["detection"]
  json.dumps(log)
  assert det["noisy_clients"] == [2, 3] and det["precision"] == 1.0 and det["recall"] == 1.0
  assert [c["corruption_rate"] for c in det["clients"]] == [0.0, 0.0, 0.5, 0.5]
  np.testing.assert_array_equal(new["label_logits"], state["label_logits"])
  assert method.before_round(ctx(3), new)[1] is False  # detection happens once

  # Warm-up rounds return no local output: nothing changes.
  same, changed, log = method.after_round(1, new, {})
  assert same is new and not changed and log == {}
  # Client 2 learns its clean labels back on its 2 corrupted samples (all 4 entries), except
  # sample 1, class 1; every other row sent back (clean clients, padding) must stay as it was.
  before = np.asarray(new["label_logits"])
  learned = before.copy()
  learned[2, :2] = 10.0 * (2.0 * setup.clean_labels[8:10] - 1.0)
  learned[2, 1, 1] = -learned[2, 1, 1]
  outputs = {"label_logits": learned + 0.0, "learned_logits": learned}
  outputs["label_logits"][4] = 99.0  # the padding client: ignored
  after, changed, log = method.after_round(2, new, outputs)
  assert changed
  np.testing.assert_array_equal(after["label_logits"][:4], learned[:4])
  np.testing.assert_array_equal(after["label_logits"][4], before[4])
  rec = log["label_correction"]
  json.dumps(log)
  # Noisy clients 2, 3: 8 samples × 2 annotated classes = 16 entries; 4 corrupted samples = 8
  # entries, all wrong in the observed labels. Client 2 fixes 3 of its 4 corrupted entries.
  assert rec["noisy_clients"] == [2, 3] and rec["entries"] == 16 and rec["corrupted_entries"] == 8
  assert rec["accuracy"]["observed"] == rec["accuracy"]["before"] == 8 / 16
  assert rec["accuracy"]["learned"] == rec["accuracy"]["after"] == 11 / 16
  assert rec["accuracy_corrupted"]["before"] == 0.0 and rec["accuracy_corrupted"]["after"] == 3 / 8
  assert rec["changed_from_observed"] == 3 / 16
  # 8 of the 16 entries are clean positives; the observed labels call 8 entries positive, 4 of
  # them right. Client 2's 4 corrupted entries hold 2 clean positives and 2 clean negatives, all
  # observed wrong; it learns them back except sample 1, class 1 (a clean positive): one more
  # true positive (5 of 8) and one positive fewer (8 − 2 + 1 = 7).
  assert rec["clean_positives"] == 8
  assert rec["positives"] == {"observed": 8, "before": 8, "learned": 7, "after": 7}
  assert rec["positive_recall"]["observed"] == 4 / 8 and rec["positive_recall"]["after"] == 5 / 8
  assert rec["clients"][0] == {"client": 2, "accuracy_before": 0.5, "accuracy_after": 7 / 8,
                               "accuracy_corrupted_after": 3 / 4}


# End to end ---------------------------------------------------------------------------------------
def _two_rounds(config):
  """Rounds 0 and 1 of `config` (warm-up, then correction): (experiment, variables, state, the
  initial label logits, the rounds' metrics records, checked to be JSON-serialisable)."""
  experiment = train.Experiment(config)
  variables, state = experiment.initial_variables(), experiment.method.init_state()
  initial = np.asarray(state["label_logits"]).copy()
  records = []
  for rnd in range(2):
    variables, state, new_records = experiment.run_round(rnd, variables, state)
    records += new_records
  json.dumps(records, default=train._json_default)
  return experiment, variables, state, initial, records


@pytest.mark.parametrize("name", ["maskedoptim", "fedelc"])
def test_two_round_run(name):
  config = tiny_config(method=name, **{f"{name}.warmup_rounds": 1})
  experiment, variables, state, initial, records = _two_rounds(config)
  method = experiment.method
  assert [r["phase"] for r in records if "phase" in r] == ["warmup", "correct"]
  detections = [r["detection"] for r in records if "detection" in r]
  assert len(detections) == 1 and detections[0]["round"] == 1
  noisy = np.asarray(state["noisy"], bool)
  assert detections[0]["noisy_clients"] == np.flatnonzero(noisy).tolist()
  corrections = [r["label_correction"] for r in records if "label_correction" in r]
  assert len(corrections) == int(noisy.any())
  logits = np.asarray(state["label_logits"])
  assert np.all(np.isfinite(logits))
  # Only the noisy clients' annotated entries may move.
  frozen = ~(noisy[:, None, None] & np.asarray(method.setup.annotated)[:, None, :])
  np.testing.assert_array_equal(logits[np.broadcast_to(frozen, logits.shape)],
                                initial[np.broadcast_to(frozen, logits.shape)])
  assert np.isfinite(experiment.evaluate(variables)["test"]["mAP"])
  assert experiment.compiled_programs == 4  # 2 phases × (client program + aggregation)


def test_train_and_evaluate_resumes_the_learned_labels(tmp_path, monkeypatch):
  """The whole loop, interrupted after round 2 was checkpointed and resumed: the label logits come
  back from the checkpoint, so the resumed run equals the straight one."""
  monkeypatch.setenv("FEDNML_NO_PROGRESS", "1")
  make = lambda: tiny_config(method="maskedoptim", rounds=4,  # noqa: E731
                             **{"maskedoptim.warmup_rounds": 1, "checkpoint.every": 1})
  straight = train.train_and_evaluate(make(), str(tmp_path / "straight"))
  records = [json.loads(line) for line in
             (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in records if "detection" in r] == [1]
  resumed = interrupt_then_resume(make, tmp_path / "resumed", 3, monkeypatch)
  assert resumed["resumed_from_round"] == 3
  assert resumed["test_final"] == straight["test_final"]


# Single-label (the published softmax form) -------------------------------------------------------
def _single_label_batch():
  """Three samples, two classes, all observed as class 0. Predictions p = softmax(z): (0.5, 0.5),
  (0.75, 0.25), (0.2, 0.8); label distributions softmax(l): (σ(10), 1 − σ(10)), (0.5, 0.5),
  (0.25, 0.75). Cross-entropy on class 0: ln 2, −ln 0.75, ln 5 (the largest: masked out)."""
  logits = jnp.array([[0.0, 0.0], [LN3, 0.0], [0.0, math.log(4.0)]])
  label_logits = jnp.array([[10.0, 0.0], [0.0, 0.0], [0.0, LN3]])
  targets = jnp.array([[1.0, 0.0]] * 3)
  return logits, label_logits, targets, jnp.ones(3)


def test_single_label_pencil_loss_by_hand():
  logits, label_logits, targets, weight = _single_label_batch()
  pred = np.array([[0.5, 0.5], [0.75, 0.25], [0.2, 0.8]])
  s10 = 1.0 / (1.0 + math.exp(-10.0))
  label = np.array([[s10, 1.0 - s10], [0.5, 0.5], [0.25, 0.75]])
  entropy = -np.sum(pred * np.log(pred), axis=1)  # ln 2, 0.562335, 0.500402
  kl = np.sum(pred * np.log(pred / label), axis=1)  # e.g. sample 1: 0.75·ln 1.5 + 0.25·ln 0.5
  compat = -np.log(label[:, 0])  # −log softmax(l)[y]: 4.5e-5, ln 2, ln 4
  assert kl[1] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
  # int(0.8·3) = 2 samples keep L_o (MaskedOptim); FedELC keeps every sample.
  for valid_fraction, mask in ((0.8, [1, 1, 0]), (1.0, [1, 1, 1])):
    expect = kl / 2 + 0.5 * np.array(mask) * compat + 0.1 * entropy / 2
    got = label_correction_loss_single_label(logits, label_logits, targets, weight,
                                             compatibility_weight=0.5, entropy_weight=0.1,
                                             valid_fraction=valid_fraction)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-7)
    # The engine's batch mean of these is the reference's `Lc/C + α·Lo + β·Le/C` of batch means,
    # `Lc = −mean Σ log softmax(l)·p − Le`, `Le = −mean Σ log softmax(z)·p`.
    le = float(np.mean(entropy))
    lc = float(-np.mean(np.sum(np.log(label) * pred, axis=1))) - le
    lo = float(np.mean(compat * np.array(mask)))
    assert float(weighted_batch_mean(got, weight)) == pytest.approx(
        lc / 2 + 0.5 * lo + 0.1 * le / 2, rel=1e-5)
  # Label gradient of the batch mean: (1/n)·[(softmax(l) − p)/C + α·mask·(softmax(l) − y)];
  # sample 1: ((−0.25, 0.25)/2 + 0.5·(−0.5, 0.5))/3 = (−0.125, 0.125); sample 2 (masked out):
  # ((0.05, −0.05)/2)/3.
  grads = jax.grad(lambda ll: weighted_batch_mean(
      label_correction_loss_single_label(logits, ll, targets, weight), weight))(label_logits)
  np.testing.assert_allclose(grads[1:], [[-0.125, 0.125], [0.025 / 3, -0.025 / 3]], atol=1e-6)


def hand_setup_single_label():
  """3 clients × 3 samples × 3 classes (classes 0, 1, 2 on each client); client 2's first two
  samples are corrupted (0 → 1, 1 → 2)."""
  clean = np.tile(np.eye(3, dtype=np.float32), (3, 1))
  corrupted = np.zeros(9, bool)
  corrupted[6:8] = True
  noisy = clean.copy()
  noisy[6], noisy[7] = [0, 1, 0], [0, 0, 1]
  layout = ClientLayout.from_indices([np.arange(k * 3, (k + 1) * 3) for k in range(3)])
  config = base_config()
  config.task = "singlelabel"
  return FederatedSetup(config=config, task=get_task("singlelabel"), layout=layout,
                        observed_labels=noisy, noisy_labels=noisy, clean_labels=clean,
                        corrupted=corrupted, annotated=np.ones((3, 3), bool))


def test_single_label_ten_times_mean_rule_and_label_diagnostics():
  # 10·(softmax(l) + softmax(z))/2: row 0: 5·((0.5, 0.25, 0.25) + (0.25, 0.5, 0.25));
  # row 1: 5·((1/3, 1/3, 1/3) + (2/3, 1/6, 1/6)).
  label_logits = jnp.array([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])
  local_logits = jnp.array([[0.0, math.log(2.0), 0.0], [math.log(4.0), 0.0, 0.0]])
  expect = [[3.75, 3.75, 2.5], [5.0, 2.5, 2.5]]
  np.testing.assert_allclose(merged_label_logits_single_label(label_logits, local_logits), expect,
                             rtol=1e-6)
  setup = hand_setup_single_label()
  method = FedELC(setup.config, setup)
  state = method.init_state()
  # 10 at the observed class, 0 elsewhere (client 2 starts from its corrupted labels).
  np.testing.assert_array_equal(state["label_logits"][2], [[0, 10, 0], [0, 0, 10], [0, 0, 10]])

  def frame(noisy):
    return types.SimpleNamespace(client={"noisy": jnp.float32(noisy), "class_mask": jnp.ones(3)},
                                 predict_all=lambda variables, view, key: (local_logits, None))

  local = {"trainable": label_logits}
  out = method.local_output("correct", local, frame=frame(1.0), variables=None, key=None)
  np.testing.assert_allclose(out["label_logits"], expect, rtol=1e-6)
  clean = method.local_output("correct", local, frame=frame(0.0), variables=None, key=None)
  np.testing.assert_array_equal(clean["label_logits"], label_logits)
  # Diagnostics use arg max per sample: client 2 (noisy) recovers sample 0 (class 0) only.
  state = dict(state, noisy=np.array([False, False, True]), detected=np.int32(1))
  learned = np.array(state["label_logits"])
  learned[2, 0] = [6.0, 4.0, 0.0]
  after, changed, log = method.after_round(3, state, {"label_logits": learned,
                                                      "learned_logits": learned})
  assert changed
  np.testing.assert_array_equal(after["label_logits"], learned)
  rec = log["label_correction"]
  json.dumps(log)
  assert rec["entries"] == 3 and rec["corrupted_entries"] == 2
  assert rec["accuracy"]["observed"] == rec["accuracy"]["before"] == 1 / 3
  assert rec["accuracy"]["after"] == 2 / 3 and rec["accuracy_corrupted"]["after"] == 1 / 2
  assert rec["changed_from_observed"] == 1 / 3
  assert rec["clients"] == [{"client": 2, "accuracy_before": 1 / 3, "accuracy_after": 2 / 3,
                             "accuracy_corrupted_after": 1 / 2}]


@pytest.mark.parametrize("name", ["maskedoptim", "fedelc"])
def test_single_label_two_round_run(name):
  config = tiny_config(method=name, task="singlelabel",
                       **{"data.source": "embedded_digits", "labels.annotation_num": None,
                          "labels.noise_type": "symmetric", "labels.noise_rate": 0.0,
                          "labels.noisy_client_fraction": 0.67, "augment.hflip": False,
                          f"{name}.warmup_rounds": 1})
  experiment, variables, state, initial, records = _two_rounds(config)
  assert [r["phase"] for r in records if "phase" in r] == ["warmup", "correct"]
  noisy = np.asarray(state["noisy"], bool)
  assert len([r for r in records if "detection" in r]) == 1
  assert noisy.any()  # the heterogeneous noise makes some client noisy: the correction ran
  assert len([r for r in records if "label_correction" in r]) == 1
  logits = np.asarray(state["label_logits"])
  assert np.all(np.isfinite(logits))
  np.testing.assert_array_equal(logits[~noisy], initial[~noisy])  # clean clients never move
  # A noisy client's real slots end as 10·(mean of two distributions): rows summing to 10.
  real = experiment.method.setup.layout.valid & noisy[:, None]
  np.testing.assert_allclose(logits[real].sum(axis=-1), 10.0, rtol=1e-5)
  assert not np.allclose(logits[real], initial[real])
  assert np.isfinite(experiment.evaluate(variables)["test"]["Accuracy"])
