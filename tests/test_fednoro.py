"""Tests of fednml_jax.methods.fednoro: the detection and the losses with numbers worked by hand,
the host step and the aggregation on a hand-made federation, and one tiny end-to-end run."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax import aggregation
from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.errors import ConfigError
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext
from fednml_jax.methods import common, fednoro
from fednml_jax.methods.fednoro import (FedNoRo, bernoulli_kd, client_class_losses,
                                        client_class_losses_single_label, detect_noisy_clients,
                                        fednoro_client_loss, fednoro_single_label_loss,
                                        fill_empty_cells, logit_adjusted_bce, logit_adjusted_ce,
                                        normalise_columns, softmax_kd)
from fednml_jax.tasks import get_task

from conftest import tiny_config


def test_registered_with_defaults():
  assert METHODS["fednoro"] is FedNoRo
  c = base_config().fednoro
  assert (c.warmup_rounds, c.ramp_end, c.kd_ceiling, c.kd_exponent, c.kd_temperature, c.tau,
          c.gmm_seeds) == (10, 49, 0.8, -5.0, 0.8, 1.0, 9)


# Detection ----------------------------------------------------------------------------------------
def test_vote_flags_the_two_high_loss_clients():
  losses = np.array([[0.2, 0.5],
                     [0.3, 0.7],
                     [1.0, 1.5],
                     [0.9, 1.3]])
  result = detect_noisy_clients(losses, num_seeds=9)
  # Column 0: min 0.2, max 1.0 → (x − 0.2)/0.8 = 0, 0.125, 1, 0.875.
  # Column 1: min 0.5, max 1.5 → (x − 0.5)/1.0 = 0, 0.2, 1, 0.8.
  np.testing.assert_allclose(result["normalised"], [[0, 0], [0.125, 0.2], [1, 1], [0.875, 0.8]],
                             atol=1e-12)
  # Two clusters {0, 1} (means ≈ (0.06, 0.1)) and {2, 3} (≈ (0.94, 0.9)): the noisy component is
  # the one with the larger sum of means; every one of the 9 fits agrees.
  np.testing.assert_array_equal(result["noisy"], [False, False, True, True])
  np.testing.assert_array_equal(result["votes"], [0, 0, 9, 9])
  assert result["reason"] is None and result["failures"] == [] and result["constant_classes"] == []


def test_empty_cells_take_the_column_minimum():
  losses = np.array([[np.nan, 0.4],
                     [0.3, 0.6],
                     [0.5, np.nan],
                     [0.9, 0.8]])
  # Column 0: nanmin = 0.3 → client 0 gets 0.3; column 1: nanmin = 0.4 → client 2 gets 0.4.
  filled = fill_empty_cells(losses)
  np.testing.assert_allclose(filled, [[0.3, 0.4], [0.3, 0.6], [0.5, 0.4], [0.9, 0.8]])
  assert np.isnan(losses[0, 0])  # the input is not modified
  # Column 0: (x − 0.3)/0.6 = 0, 0, 1/3, 1;  column 1: (x − 0.4)/0.4 = 0, 0.5, 0, 1.
  normalised, constant = normalise_columns(filled)
  np.testing.assert_allclose(normalised, [[0, 0], [0, 0.5], [1 / 3, 0], [1, 1]], atol=1e-12)
  assert not constant.any()
  # A column nobody fills becomes 0, then constant → 0 (and reported), not NaN.
  filled = fill_empty_cells(np.array([[np.nan, 1.0], [np.nan, 2.0]]))
  np.testing.assert_array_equal(filled, [[0.0, 1.0], [0.0, 2.0]])
  normalised, constant = normalise_columns(filled)
  np.testing.assert_array_equal(normalised, [[0, 0], [0, 1]])
  np.testing.assert_array_equal(constant, [True, False])


def test_client_class_losses_by_hand():
  # 2 clients × 2 slots × 2 classes; client 1 has one real slot and annotates class 1 only.
  probs = np.array([[[0.9, 0.2], [0.5, 0.6]], [[0.1, 0.8], [0.3, 0.3]]])
  labels = np.array([[[1, 0], [1, 1]], [[0, 1], [0, 0]]], np.float32)
  valid = np.array([[True, True], [True, False]])
  annotated = np.array([[True, True], [False, True]])
  got = client_class_losses(probs, labels, valid, annotated)
  # client 0, class 0: (−ln 0.9 − ln 0.5)/2; class 1: (−ln 0.8 − ln 0.6)/2.
  # client 1, class 0: not annotated → empty (NaN); class 1: −ln 0.8 (the padding slot is ignored).
  expect = [[(0.1053605 + 0.6931472) / 2, (0.2231436 + 0.5108256) / 2], [np.nan, 0.2231436]]
  np.testing.assert_allclose(got, expect, atol=1e-6)


def test_degenerate_detections_flag_nobody(monkeypatch):
  one = detect_noisy_clients(np.array([[0.5, 0.7]]))
  assert not one["noisy"].any() and "fewer than 2" in one["reason"]
  flat = detect_noisy_clients(np.array([[0.5, np.nan], [0.5, 0.3], [0.5, np.nan]]))
  assert not flat["noisy"].any() and "constant" in flat["reason"]
  assert flat["constant_classes"] == [0, 1]
  inf = detect_noisy_clients(np.array([[np.inf, 0.1], [0.2, 0.3]]))
  assert not inf["noisy"].any() and inf["reason"] is not None

  class Failing:
    def __init__(self, **kwargs):
      pass

    def fit(self, features):
      raise ValueError("boom")

  monkeypatch.setattr(common, "GaussianMixture", Failing)
  failed = detect_noisy_clients(np.array([[0.1, 0.2], [0.9, 0.8], [0.2, 0.1]]), num_seeds=3)
  assert not failed["noisy"].any() and "every GMM fit failed" in failed["reason"]
  assert len(failed["failures"]) == 3


# Losses -------------------------------------------------------------------------------------------
def test_logit_adjusted_bce_by_hand():
  logits = jnp.array([[0.0, 1.0]])
  targets = jnp.array([[1.0, 0.0]])
  prior = jnp.array([0.25, 0.5])
  # class 0, target 1: z' = 0 + ln 0.25, σ(z') = 1/(1 + 4) = 0.2, BCE = −ln 0.2 = 1.6094379
  # class 1, target 0: z' = 1 + ln(1 − 0.5), σ(z') = e/(e + 2), BCE = −ln(2/(e + 2)) = 0.8582976
  both = logit_adjusted_bce(logits, targets, prior, jnp.array([1.0, 1.0]))
  assert both.shape == (1,)
  np.testing.assert_allclose(np.asarray(both), [(1.6094379 + 0.8582976) / 2], atol=1e-6)
  # Class 1 not annotated: masked out, the mean is over class 0 alone.
  only0 = logit_adjusted_bce(logits, targets, prior, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(np.asarray(only0), [1.6094379], atol=1e-6)
  # τ = 0: plain BCE (−ln ½ and −ln(1 − σ(1)) = ln(1 + e)).
  plain = logit_adjusted_bce(logits, targets, prior, jnp.array([1.0, 1.0]), tau=0.0)
  np.testing.assert_allclose(np.asarray(plain), [(math.log(2) + math.log(1 + math.e)) / 2],
                             atol=1e-6)
  # Priors 0 and 1: the logs are clamped at ln 1e-12 = −27.631021 instead of −inf.
  # class 0: z' = 0 − 27.631021, BCE = softplus(27.631021) ≈ 27.631021; class 1: z' = 1 − 27.631021,
  # target 0: BCE = softplus(−26.631021) ≈ 2.7e-12.
  clamped = logit_adjusted_bce(logits, targets, jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(np.asarray(clamped), [27.631021 / 2], rtol=1e-5)


def test_bernoulli_kd_is_the_kl_divergence():
  # Teacher logits 0 → q = ½ (at any temperature); student σ = 0.2: KL = ½ ln(½/0.2) + ½ ln(½/0.8).
  got = bernoulli_kd(jnp.array([math.log(0.25)]), jnp.array([0.0]), temperature=0.8)
  np.testing.assert_allclose(np.asarray(got), [0.5 * math.log(2.5) + 0.5 * math.log(0.625)],
                             atol=1e-6)
  # The teacher is sharpened by T = 0.8: t = 0.8·ln 3 → q = σ(ln 3) = ¾; a matching student: KL = 0.
  np.testing.assert_allclose(
      np.asarray(bernoulli_kd(jnp.array([math.log(3)]), jnp.array([0.8 * math.log(3)]))), [0.0],
      atol=1e-6)


def hand_setup(*, rounds=100, pad_clients_to=1, num_real=4, warmup_rounds=10):
  """4 clients × 10 samples, 2 classes; clients 2 and 3 have 5 corrupted (flipped) samples each;
  client 1 annotates class 0 only, the others both classes."""
  rng = np.random.default_rng(0)
  n, num_classes = 10 * num_real, 2
  clean = (rng.random((n, num_classes)) < 0.4).astype(np.float32)
  corrupted = np.zeros(n, bool)
  for k in (2, 3):
    if k < num_real:
      corrupted[10 * k:10 * k + 5] = True
  noisy = np.where(corrupted[:, None], 1.0 - clean, clean).astype(np.float32)
  annotated = np.ones((num_real, num_classes), bool)
  if num_real > 1:
    annotated[1, 1] = False
  observed = noisy * np.repeat(annotated, 10, axis=0)
  layout = ClientLayout.from_indices([np.arange(10 * k, 10 * k + 10) for k in range(num_real)],
                                     pad_clients_to=pad_clients_to)
  config = base_config()
  config.method = "fednoro"
  config.rounds = rounds
  config.fednoro.warmup_rounds = warmup_rounds
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=noisy, clean_labels=clean,
                        corrupted=corrupted, annotated=layout.pad_clients(annotated, False))


def test_client_loss_distils_only_on_noisy_clients():
  setup = hand_setup()
  method = FedNoRo(setup.config, setup)
  logits = jnp.array([[0.0, 1.0], [2.0, -1.0]])
  teacher = jnp.array([[1.0, 1.0], [0.5, 0.0]])
  targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  client = {"class_mask": jnp.array([1.0, 1.0]), "class_prior": jnp.array([0.25, 0.5])}
  kwargs = dict(logits=logits, batch={"targets": targets}, teacher_logits=teacher,
                scalars={"w_kd": jnp.float32(0.5)})
  la = logit_adjusted_bce(logits, targets, client["class_prior"], client["class_mask"])
  z = fednoro.adjusted_logits(logits, targets, client["class_prior"])
  kd = jnp.mean(bernoulli_kd(z, teacher, 0.8), axis=-1)
  clean = method.client_loss("robust", client={**client, "noisy": jnp.float32(0.0)}, **kwargs)
  noisy = method.client_loss("robust", client={**client, "noisy": jnp.float32(1.0)}, **kwargs)
  np.testing.assert_allclose(np.asarray(clean), np.asarray(la), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(noisy), np.asarray(0.5 * la + 0.5 * kd), rtol=1e-6)
  assert not np.allclose(np.asarray(noisy), np.asarray(clean))
  # Warm-up: the logit-adjusted loss whatever the flag, and no teacher is needed.
  warm = method.client_loss("warmup", client={**client, "noisy": jnp.float32(1.0)},
                            **{**kwargs, "teacher_logits": None})
  np.testing.assert_allclose(np.asarray(warm), np.asarray(la), rtol=1e-6)
  # w_kd = 0: a noisy client is a clean one.
  zero = fednoro_client_loss(logits, targets, teacher, client["class_prior"], client["class_mask"],
                             1.0, 0.0)
  np.testing.assert_allclose(np.asarray(zero), np.asarray(la), rtol=1e-6)


# Schedule, state and config -----------------------------------------------------------------------
def test_ramp_weight():
  setup = hand_setup(rounds=100)
  method = FedNoRo(setup.config, setup)
  assert method.ramp_end() == 49
  # w(t) = 0.8·exp(−5·(1 − (clip(t, 10, 49) − 10)/39)²)
  assert method.kd_weight(0) == method.kd_weight(10) == pytest.approx(0.8 * math.exp(-5))
  assert method.kd_weight(10) == pytest.approx(0.00539, abs=1e-5)
  assert method.kd_weight(30) == pytest.approx(0.8 * math.exp(-5 * (19 / 39) ** 2))
  assert method.kd_weight(30) == pytest.approx(0.2442, abs=1e-4)
  assert method.kd_weight(49) == pytest.approx(0.8) and method.kd_weight(99) == pytest.approx(0.8)
  assert method.scalars(30, method.init_state()) == {"w_kd": method.kd_weight(30)}
  # A 20-round run: the ramp ends at the last round, 19.
  short = hand_setup(rounds=20)
  method = FedNoRo(short.config, short)
  assert method.ramp_end() == 19
  assert method.kd_weight(19) == pytest.approx(0.8)
  assert method.kd_weight(15) == pytest.approx(0.8 * math.exp(-5 * (4 / 9) ** 2))


@pytest.mark.parametrize("key, value", [("gmm_seeds", 0), ("kd_ceiling", 1.5), ("tau", -1.0),
                                        ("warmup_rounds", -1), ("kd_temperature", 0.0),
                                        ("kd_exponent", 1.0)])
def test_config_ranges(key, value):
  setup = hand_setup()
  setup.config.fednoro[key] = value
  with pytest.raises(ConfigError, match=f"fednoro.{key}"):
    FedNoRo(setup.config, setup)


def test_client_arrays_and_detection_on_a_hand_made_federation():
  setup = hand_setup(pad_clients_to=5)  # 4 real clients + 1 padding client
  method = FedNoRo(setup.config, setup)
  state = method.init_state()
  per_sample, per_client = method.client_arrays(state)
  assert per_sample["targets"].shape == (5, 10, 2)
  np.testing.assert_array_equal(per_client["noisy"], np.zeros(5, np.float32))
  np.testing.assert_array_equal(per_client["detected"], np.zeros(5, np.float32))
  np.testing.assert_array_equal(per_client["class_mask"][1], [1.0, 0.0])
  observed = setup.observed_labels.reshape(4, 10, 2)
  np.testing.assert_allclose(per_client["class_prior"][:4], observed.mean(axis=1), rtol=1e-6)
  np.testing.assert_array_equal(per_client["class_prior"][1, 1], 0.0)  # not annotated: no positive

  # A global model that predicts the clean labels: the corrupted clients 2 and 3 have high losses.
  jitter = np.random.default_rng(1).uniform(-0.05, 0.05, (5, 10, 2))
  probs = setup.layout.gather(np.where(setup.clean_labels > 0, 0.85, 0.15)) + jitter
  calls = []

  def predict_train():
    calls.append(1)
    return probs

  ctx = lambda r: RoundContext(round=r, global_vars=None, predict_train=predict_train)  # noqa: E731
  assert method.phase(9) == "warmup" and method.phase(10) == "robust"
  assert method.uses_teacher("robust") and not method.uses_teacher("warmup")
  same, changed, log = method.before_round(ctx(9), state)
  assert same is state and not changed and log == {} and not calls
  new, changed, log = method.before_round(ctx(10), state)
  assert changed and calls == [1]
  np.testing.assert_array_equal(new["noisy"], [False, False, True, True, False])
  assert int(new["detected"]) == 1 and int(state["detected"]) == 0
  det = log["detection"]
  json.dumps(log)
  assert det["noisy_clients"] == [2, 3] and det["clean_clients"] == [0, 1]
  assert det["reason"] is None and len(det["clients"]) == 4
  assert [c["corruption_rate"] for c in det["clients"]] == [0.0, 0.0, 0.5, 0.5]
  assert det["mean_corruption_flagged"] == 0.5 and det["mean_corruption_clean"] == 0.0
  assert det["loss_matrix"][1][1] is None  # client 1 does not annotate class 1: an empty cell
  _, per_client = method.client_arrays(new)
  np.testing.assert_array_equal(per_client["noisy"], [0, 0, 1, 1, 0])
  np.testing.assert_array_equal(per_client["detected"], np.ones(5, np.float32))
  # Detection happens once.
  again, changed, log = method.before_round(ctx(11), new)
  assert again is new and not changed and log == {} and calls == [1]


def test_detection_with_a_single_client_does_not_crash():
  setup = hand_setup(num_real=1, warmup_rounds=1)
  method = FedNoRo(setup.config, setup)
  probs = np.full((1, 10, 2), 0.5)
  new, changed, log = method.before_round(
      RoundContext(round=1, global_vars=None, predict_train=lambda: probs), method.init_state())
  assert changed and not new["noisy"].any() and "fewer than 2" in log["detection"]["reason"]
  json.dumps(log)


def test_aggregation_switches_to_daagg_after_detection():
  setup = hand_setup()
  setup.config.fl.client_weighting = "uniform"
  method = FedNoRo(setup.config, setup)
  stacked = {"params": {"w": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 4.0], [3.0, 3.0]])},
             "batch_stats": {"m": jnp.array([1.0, 2.0, 3.0, 4.0])}}
  count = jnp.array([1, 1, 2, 4], jnp.int32)
  noisy = jnp.array([0.0, 0.0, 1.0, 1.0])
  before = {"count": count, "per_client": {"noisy": noisy, "detected": jnp.zeros(4)}}
  after = {"count": count, "per_client": {"noisy": noisy, "detected": jnp.ones(4)}}
  # Before detection: config.aggregation ("mean") with fl.client_weighting = "uniform".
  got = method.aggregate(stacked, before, None)
  np.testing.assert_allclose(np.asarray(got["params"]["w"]), [1.0, 1.75], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got["batch_stats"]["m"]), 2.5, rtol=1e-6)
  # After: DaAgg with sample-count weights and the noisy mask.
  got = method.aggregate(stacked, after, None)
  expect = aggregation.daagg(stacked, count.astype(jnp.float32), noisy > 0)
  for a, b in zip(np.asarray(got["params"]["w"]), np.asarray(expect["params"]["w"])):
    assert a == pytest.approx(b, rel=1e-6)
  assert not np.allclose(np.asarray(got["params"]["w"]), [1.0, 1.75])


# End to end ---------------------------------------------------------------------------------------
def test_train_and_evaluate_smoke(tmp_path):
  from fednml_jax import train
  config = tiny_config(method="fednoro", rounds=3, **{"fednoro.warmup_rounds": 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "summary.json").exists() and summary["method"] == "fednoro"
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  detections = [r for r in records if "detection" in r]
  assert len(detections) == 1 and detections[0]["round"] == 1
  det = detections[0]["detection"]
  assert len(det["clients"]) == config.fl.num_clients
  assert sorted(det["noisy_clients"] + det["clean_clients"]) == list(range(config.fl.num_clients))
  phases = [r["phase"] for r in records if "phase" in r]
  assert phases == ["warmup", "robust", "robust"]
  assert np.isfinite(summary["test_final"]["mAP"])


# Single-label (FedNoRo as published) --------------------------------------------------------------
def test_single_label_losses_by_hand():
  logits = jnp.array([[1.0, 0.0]])
  targets = jnp.array([[1.0, 0.0]])
  prior = jnp.array([0.25, 0.75])
  # z' = [1 + ln 0.25, ln 0.75] = [−0.386294, −0.287682]; CE = −z'_0 + ln(e^z'_0 + e^z'_1).
  z = np.array([1.0 + math.log(0.25), math.log(0.75)])
  ce = -z[0] + math.log(math.exp(z[0]) + math.exp(z[1]))  # = 0.743838
  assert float(logit_adjusted_ce(logits, targets, prior)[0]) == pytest.approx(ce, abs=1e-5)
  # KD against a teacher [0, 0.8] at T = 0.8: softmax([0, 1]) = [0.268941, 0.731059].
  t = np.array([0.268941, 0.731059])
  s_log = z - math.log(math.exp(z[0]) + math.exp(z[1]))
  kd = float(np.sum(t * (np.log(t) - s_log)))
  teacher = jnp.array([[0.0, 0.8]])
  assert float(softmax_kd(jnp.asarray(z)[None], teacher, 0.8)[0]) == pytest.approx(kd, abs=1e-5)
  # Noisy client at w = 0.5: (1 − 0.5)·CE + 0.5·KD; a clean client gets CE alone.
  noisy = fednoro_single_label_loss(logits, targets, teacher, prior, 1.0, 0.5)
  clean = fednoro_single_label_loss(logits, targets, teacher, prior, 0.0, 0.5)
  assert float(noisy[0]) == pytest.approx(0.5 * ce + 0.5 * kd, abs=1e-5)
  assert float(clean[0]) == pytest.approx(ce, abs=1e-5)


def test_single_label_class_wise_losses_by_hand():
  # Client 0: samples of class 0 (p[y] 0.8), class 1 (0.5), class 1 (0.25); client 1: one class-0
  # sample (0.5) and a padding slot.
  probs = np.array([[[0.8, 0.2], [0.5, 0.5], [0.75, 0.25]], [[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]]])
  labels = np.array([[[1, 0], [0, 1], [0, 1]], [[1, 0], [1, 0], [0, 1]]], np.float32)
  valid = np.array([[True, True, True], [True, False, False]])
  got = client_class_losses_single_label(probs, labels, valid)
  expect = [[-math.log(0.8), (-math.log(0.5) - math.log(0.25)) / 2], [-math.log(0.5), np.nan]]
  np.testing.assert_allclose(got, expect, atol=1e-9)


def test_single_label_smoke(tmp_path):
  from fednml_jax import train
  config = tiny_config(method="fednoro", rounds=2, task="singlelabel",
                       **{"data.source": "embedded_digits", "labels.annotation_num": None,
                          "labels.noise_type": "pair", "fednoro.warmup_rounds": 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in records if "phase" in r] == ["warmup", "robust"]
  assert len([r for r in records if "detection" in r]) == 1
  assert 0.0 <= summary["test_final"]["Accuracy"] <= 1.0
