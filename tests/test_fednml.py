"""Tests of fednml_jax.methods.fednml: the pure pieces with numbers worked by hand, the host step
on a hand-made federation, and one short end-to-end run on the embedded data."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax.config import base_config
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.methods import METHODS, FederatedSetup, RoundContext

from conftest import interrupt_then_resume, tiny_config
from fednml_jax.methods.fednml import (FedNML, consistency_and_loss, fit_noise_gmm,
                                       hybrid_pseudo_labels, kd_weight, logit_adjusted_kd_loss,
                                       refine_label_table, update_class_counts)
from fednml_jax.tasks import get_task



def test_registered():
  assert METHODS["fednml"] is FedNML
  c = base_config().fednml
  assert (c.warmup_rounds, c.refine_every, c.hard_high, c.hard_low, c.missing_momentum,
          c.kd_ceiling, c.kd_exponent, c.tau, c.reference_label_init, c.gmm_seed) == (
              10, 5, 0.9, 0.1, 0.8, 0.8, -2.0, 1.0, False, 0)


def test_consistency_and_loss_by_hand():
  probs = np.array([[0.9, 0.2], [0.5, 0.5], [0.1, 0.8]])
  labels = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
  c, loss = consistency_and_loss(probs, labels)
  # sample 0: c = (0.9 + 0.8)/2 = 0.85;  ℓ = (−ln 0.9 − ln 0.8)/2 = (0.1053605 + 0.2231436)/2
  # sample 1: c = (0.5 + 0.5)/2 = 0.5;   ℓ = ln 2
  # sample 2: c = (0.1 + 0.2)/2 = 0.15;  ℓ = (−ln 0.1 − ln 0.2)/2 = (2.3025851 + 1.6094379)/2
  np.testing.assert_allclose(c, [0.85, 0.5, 0.15], atol=1e-12)
  np.testing.assert_allclose(loss, [0.1642520, 0.6931472, 1.9560115], atol=1e-6)
  # Annotated class 0 only (the first refinement): c = p or 1 − p of class 0, ℓ = its BCE.
  c0, loss0 = consistency_and_loss(probs, labels, np.array([True, False]))
  np.testing.assert_allclose(c0, [0.9, 0.5, 0.1], atol=1e-12)
  np.testing.assert_allclose(loss0, [0.1053605, 0.6931472, 2.3025851], atol=1e-6)
  # p = 1 on a negative: PyTorch clamps ln(0) at −100, so ℓ = 100/2 (finite, no warning).
  _, clamped = consistency_and_loss(np.array([[1.0, 1.0]]), np.array([[1.0, 0.0]]))
  np.testing.assert_allclose(clamped, [50.0])


def test_noisy_component_is_the_low_consistency_cluster():
  rng = np.random.default_rng(0)
  clean = np.stack([0.9 + 0.01 * rng.standard_normal(12), -0.1 + 0.01 * rng.standard_normal(12)], 1)
  noisy = np.stack([0.4 + 0.01 * rng.standard_normal(5), -1.5 + 0.01 * rng.standard_normal(5)], 1)
  order = rng.permutation(17)
  features = np.concatenate([clean, noisy])[order]
  truth = (np.arange(17) >= 12)[order]
  flagged, reason, gmm = fit_noise_gmm(features, seed=0)
  assert reason is None and gmm.converged_
  np.testing.assert_array_equal(flagged, truth)
  # The same split whichever way the features are listed (component order must not matter).
  flagged_rev, _, _ = fit_noise_gmm(features[::-1], seed=0)
  np.testing.assert_array_equal(flagged_rev, truth[::-1])


@pytest.mark.parametrize("features,why", [
    (np.array([[0.9, -0.1], [0.4, -1.5]]), "too few"),
    (np.tile([[0.7, -0.3]], (20, 1)), "identical"),
    (np.array([[0.1, 0.2]] * 5 + [[np.nan, 0.0]]), "non-finite"),
])
def test_degenerate_gmm_inputs_flag_nothing(features, why):
  flagged, reason, gmm = fit_noise_gmm(features)
  assert flagged.dtype == bool and flagged.shape == (len(features),) and not flagged.any()
  assert why in reason and gmm is None


def test_hybrid_pseudo_labels_thresholds_are_strict():
  p = np.array([[0.95, 0.9, 0.5, 0.1, 0.05]])
  np.testing.assert_allclose(hybrid_pseudo_labels(p), [[1.0, 0.9, 0.5, 0.1, 0.0]])
  np.testing.assert_allclose(hybrid_pseudo_labels(p, high=0.4, low=0.2), [[1, 1, 1, 0, 0]])


def test_refine_label_table_and_missing_class_moving_average():
  table = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])
  pseudo = np.array([[1.0, 0.3, 0.6], [0.0, 1.0, 1.0]])
  noisy = np.array([True, False])
  annotated = np.array([True, True, False])
  out = refine_label_table(table, pseudo, noisy, annotated, momentum=0.8)
  # sample 0 (noisy): annotated ← q = [1, 0.3]; missing ← 0.2·0.6 + 0.8·0 = 0.12
  # sample 1 (clean): annotated kept [1, 0];    missing ← 0.2·1 + 0.8·0.5 = 0.6
  np.testing.assert_allclose(out, [[1.0, 0.3, 0.12], [1.0, 0.0, 0.6]], atol=1e-12)
  np.testing.assert_array_equal(table, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.5]])  # input untouched


def test_update_class_counts():
  # Σ_i Ŷ = [2, 0.3, 0.72]; 0.25·[2, 0.3, 0.72] + 0.75·[5, 2, 0] = [4.25, 1.575, 0.18]
  table = np.array([[1.0, 0.3, 0.12], [1.0, 0.0, 0.6]])
  np.testing.assert_allclose(update_class_counts(np.array([5.0, 2.0, 0.0]), table, 0.25),
                             [4.25, 1.575, 0.18], atol=1e-12)


def test_logit_adjusted_kd_loss_by_hand():
  logits = jnp.array([[0.0, 1.0]])
  teacher = jnp.array([[0.0, 0.0]])  # σ = 0.5
  prior = jnp.array([0.25, 0.5])
  # class 0, target 1: z' = 0 + ln 0.25, σ(z') = 1/(1 + 4) = 0.2
  # class 1, target 0: z' = 1 + ln(1 − 0.5), σ(z') = e/(e + 2) = 0.5761169
  # KD  = mean(−½ln 0.2 − ½ln 0.8, −½ln(e/(e+2)) − ½ln(2/(e+2))) = mean(0.9162907, 0.7048717)
  # sup = mean(−ln 0.2, −ln(2/(e+2))) = mean(1.6094379, 0.8582976)
  kd = (0.9162907 + 0.7048717) / 2
  sup = (1.6094379 + 0.8582976) / 2
  got = logit_adjusted_kd_loss(logits, jnp.array([[1.0, 0.0]]), teacher, prior, 0.25)
  assert got.shape == (1,)
  np.testing.assert_allclose(np.asarray(got), [0.25 * kd + 0.75 * sup], atol=1e-5)
  # A soft target 0.7 on class 0 is adjusted as a negative (`target == 1` in the reference):
  # z' = ln 0.75, σ = 3/7; sup entry = −0.7 ln(3/7) − 0.3 ln(4/7).
  soft = logit_adjusted_kd_loss(logits, jnp.array([[0.7, 0.0]]), teacher, prior, 0.0)
  expect = (-0.7 * math.log(3 / 7) - 0.3 * math.log(4 / 7) + 0.8582976) / 2
  np.testing.assert_allclose(np.asarray(soft), [expect], atol=1e-5)
  # tau = 0: no adjustment, w_kd = 1: pure distillation towards σ(teacher).
  plain = logit_adjusted_kd_loss(logits, jnp.array([[1.0, 0.0]]), teacher, prior, 1.0, tau=0.0)
  expect = (math.log(2) + (-0.5 * math.log(1 / (1 + math.exp(-1))) - 0.5 * math.log(
      1 / (1 + math.e)))) / 2
  np.testing.assert_allclose(np.asarray(plain), [expect], atol=1e-5)


def test_kd_weight_ramp():
  w = lambda t: kd_weight(t, warmup=10, end=100)  # noqa: E731
  assert w(10) == pytest.approx(0.8 * math.exp(-2), abs=1e-9) and w(10) == pytest.approx(0.108, abs=1e-3)
  assert w(55) == pytest.approx(0.8 * math.exp(-0.5), abs=1e-9) and w(55) == pytest.approx(0.485, abs=1e-3)
  assert w(100) == pytest.approx(0.8) and w(150) == pytest.approx(0.8) and w(0) == w(10)
  assert kd_weight(3, warmup=10, end=10) == 0.8 and kd_weight(3, warmup=10, end=5) == 0.8


# The host step on a hand-made federation ----------------------------------------------------------
def tiny_setup(reference_label_init=False, rounds=20):
  """2 clients × 12 samples, 3 classes; client 0 annotates {0, 1}, client 1 annotates {1, 2}."""
  rng = np.random.default_rng(1)
  n, num_classes = 24, 3
  clean = (rng.random((n, num_classes)) < 0.4).astype(np.float32)
  noisy = clean.copy()
  corrupted = np.zeros(n, bool)
  corrupted[[0, 1, 2, 12, 13, 14]] = True
  noisy[corrupted] = 1.0 - noisy[corrupted]
  annotated = np.array([[True, True, False], [False, True, True]])
  layout = ClientLayout.from_indices([np.arange(12), np.arange(12, 24)])
  observed = noisy.copy()
  observed[:12, 2] = 0.0
  observed[12:, 0] = 0.0
  config = base_config()
  config.method = "fednml"
  config.rounds = rounds
  config.fednml.reference_label_init = reference_label_init
  for a in (clean, noisy, observed, corrupted, annotated):
    a.flags.writeable = False
  return FederatedSetup(config=config, task=get_task("multilabel"), layout=layout,
                        observed_labels=observed, noisy_labels=noisy, clean_labels=clean,
                        corrupted=corrupted, annotated=annotated)


def test_reference_label_init_changes_only_missing_class_positives():
  plain = FedNML(tiny_setup().config, tiny_setup())
  setup_leak = tiny_setup(reference_label_init=True)
  leaky = FedNML(setup_leak.config, setup_leak)
  s0, s1 = plain.init_state(), leaky.init_state()
  diff = s0["label_table"] != s1["label_table"]
  layout = setup_leak.layout
  missing = ~setup_leak.annotated[:, None, :] & layout.valid[..., None]
  hidden_positive = missing & (layout.gather(setup_leak.noisy_labels) == 1)
  assert hidden_positive.any()
  np.testing.assert_array_equal(diff, hidden_positive)
  np.testing.assert_allclose(s1["class_counts"] - s0["class_counts"], hidden_positive.sum(axis=1))
  # Both start with n_c = Σ_i Ŷ_ic and π_c = n_c / n_k.
  _, per_client = plain.client_arrays(s0)
  np.testing.assert_allclose(per_client["class_prior"], s0["label_table"].sum(axis=1) / 12)


def test_before_round_refines_and_logs_json_diagnostics():
  setup = tiny_setup()
  method = FedNML(setup.config, setup)
  state = method.init_state()
  # A global model that predicts the clean labels (confidently) everywhere.
  probs = setup.layout.gather(np.where(setup.clean_labels > 0, 0.97, 0.03).astype(np.float32))
  ctx = lambda r: RoundContext(round=r, global_vars=None, predict_train=lambda: probs)  # noqa: E731
  assert method.phase(9) == "warmup" and method.phase(10) == "refine"
  assert method.uses_teacher("refine") and not method.uses_teacher("warmup")
  same, changed, log = method.before_round(ctx(9), state)
  assert same is state and not changed and log == {}
  assert not method.before_round(ctx(12), state)[1]
  new, changed, log = method.before_round(ctx(10), state)
  assert changed and new["refinements"] == 1 and state["refinements"] == 0
  assert log["features_on"] == "annotated classes"
  json.dumps(log)
  overall = log["overall"]
  for key in ("flagged", "noisy_precision", "noisy_recall", "corrupted_label_acc",
              "missing_label_acc", "hard_fraction", "soft_fraction"):
    assert key in overall
  assert len(log["clients"]) == 2 and log["degenerate"] == []
  # The corrupted samples disagree with the model on the annotated classes: flagged, relabelled.
  assert overall["noisy_precision"] == 1.0 and overall["noisy_recall"] == 1.0
  assert overall["corrupted_label_acc"] == 1.0 and overall["hard_fraction"] == 1.0
  assert overall["corrupted_label_acc_before"] < 1.0
  assert overall["annotated_label_mae"] < overall["annotated_label_mae_before"]
  # Missing classes: 0.2·1 + 0.8·0 = 0.2 on hidden positives, still rounded to 0 after one step.
  hidden = new["label_table"][0, :, 2]
  np.testing.assert_allclose(hidden[setup.clean_labels[:12, 2] > 0], 0.2, atol=1e-6)
  w = method.kd_weight(10)
  expect = w * new["label_table"].sum(axis=1) + (1 - w) * state["class_counts"]
  np.testing.assert_allclose(new["class_counts"], expect, rtol=1e-5)
  _, log15 = method.before_round(ctx(15), new)[1:]
  assert log15["features_on"] == "all classes" and log15["refinement"] == 2


def test_before_round_survives_a_two_sample_client():
  setup = tiny_setup()
  layout = ClientLayout.from_indices([np.arange(2), np.arange(12, 24)])
  setup = FederatedSetup(**{**setup.__dict__, "layout": layout})
  method = FedNML(setup.config, setup)
  probs = np.full((2, 12, 3), 0.5, np.float32)
  _, changed, log = method.before_round(
      RoundContext(round=10, global_vars=None, predict_train=lambda: probs), method.init_state())
  assert changed and log["degenerate"][0]["client"] == 0
  json.dumps(log)


# End to end ---------------------------------------------------------------------------------------
def smoke_config():
  return tiny_config(method="fednml", rounds=4, **{
      "fednml.warmup_rounds": 2, "fednml.refine_every": 1, "eval.every": 2,
      "checkpoint.every": 1})


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_train_and_evaluate_smoke_and_resume(tmp_path, monkeypatch):
  from fednml_jax import train
  monkeypatch.setenv("FEDNML_NO_PROGRESS", "1")
  config = smoke_config()
  config.plots = True  # one PNG per client and refinement (does not change results)
  summary = train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert (tmp_path / "straight" / "summary.json").exists() and summary["method"] == "fednml"
  pngs = sorted(p.name for p in (tmp_path / "straight" / "plots").iterdir())
  assert pngs == [f"gmm_round{r:03d}_client{k}.png" for r in (2, 3) for k in range(3)]
  assert all((tmp_path / "straight" / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
  records = _records(tmp_path / "straight")
  refinements = [r for r in records if r.get("kind") == "refinement"]
  assert [r["round"] for r in refinements] == [2, 3]
  assert [r["features_on"] for r in refinements] == ["annotated classes", "all classes"]
  for r in refinements:
    assert {"refinement", "w_kd", "overall", "clients", "degenerate"} <= set(r)
    assert {"flagged", "noisy_precision", "noisy_recall", "corrupted_label_acc",
            "missing_label_acc", "hard_fraction"} <= set(r["overall"])
    assert len(r["clients"]) == config.fl.num_clients
  phases = [r["phase"] for r in records if "phase" in r]
  assert phases == ["warmup", "warmup", "refine", "refine"]
  assert np.isfinite(summary["test_final"]["mAP"])

  # Interrupted after the first refinement's round was checkpointed, then resumed: the restored
  # label table, class counts and refinement count give the same run.
  resumed = interrupt_then_resume(smoke_config, tmp_path / "resumed", 3, monkeypatch)
  assert resumed["resumed_from_round"] == 3
  assert resumed["test_final"] == summary["test_final"]
  again = [r for r in _records(tmp_path / "resumed") if r.get("kind") == "refinement"]
  assert again == refinements


def test_refine_labels_false_keeps_the_table_and_fits_nothing():
  """The ablation switch: phase 2 still runs, the label table is never refined."""
  setup = tiny_setup()
  setup.config.fednml.refine_labels = False
  method = FedNML(setup.config, setup)
  state = method.init_state()

  def no_pass():
    raise AssertionError("no device pass without refinement")

  new, changed, log = method.before_round(
      RoundContext(round=10, global_vars=None, predict_train=no_pass), state)
  assert new is state and not changed and log == {}
  assert method.phase(10) == "refine" and method.uses_teacher("refine")


def test_positive_label_recall_counts_erased_positives():
  from fednml_jax.methods.fednml import _label_quality_counts, _label_quality_ratios
  clean = np.array([[1, 0], [1, 1], [0, 0]], np.float32)  # 3 positives, class 1 missing
  before = np.array([[1, 0], [1, 0], [0, 0]], np.float32)
  after = np.array([[0.2, 0.7], [1, 0.1], [0, 0]], np.float32)  # sample 0's positive erased
  counts = _label_quality_counts(before=before, after=after, pseudo=after,
                                 noisy=np.array([True, False, False]),
                                 corrupted=np.array([True, False, False]), clean=clean,
                                 annotated=np.array([True, False]))
  ratios = _label_quality_ratios(counts)
  # Annotated class 0 holds 2 clean positives: both > 0.5 before, 1 of 2 after.
  assert ratios["positive_label_recall_before"] == 1.0 and ratios["positive_label_recall"] == 0.5
  # Missing class 1 holds 1 clean positive (sample 1): its table value 0.1 misses it.
  assert ratios["missing_positive_recall"] == 0.0
