"""The single-label task: metrics by hand, symmetric / pair / instance noise with per-client rates,
config errors, and a short FedAvg run on the embedded single digits."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from fednml_jax import config as config_lib
from fednml_jax import metrics
from fednml_jax.corruption import (STREAM_CLIENT_RATES, client_noise_rates, corrupt_single_labels,
                                   simulate_clients, stream)
from fednml_jax.corruption.singlelabel_noise import (instance_flip_distribution, pair_flip,
                                                     symmetric_flip, truncated_normal)
from fednml_jax.errors import ConfigError, DataError
from fednml_jax.tasks import get_task


def one_hot(classes, num_classes):
  return np.eye(num_classes, dtype=np.uint8)[np.asarray(classes)]


def single_label_config(**overrides):
  settings = {"task": "singlelabel", "data.source": "embedded_digits",
              "labels.annotation_num": None, "labels.noise_type": "symmetric",
              "augment.hflip": False}
  settings.update(overrides)
  return tiny_config(**settings)


# --- metrics and loss ----------------------------------------------------------------------------

def test_singlelabel_metrics_by_hand():
  labels = one_hot([0, 1, 2, 1], 3)
  probs = np.array([[0.7, 0.1, 0.2],   # → 0, right
                    [0.5, 0.2, 0.3],   # → 0, wrong (class 1)
                    [0.1, 0.3, 0.6],   # → 2, right
                    [0.2, 0.6, 0.2]])  # → 1, right
  out = metrics.singlelabel_metrics(probs, labels)
  assert out["Accuracy"] == pytest.approx(3 / 4)
  # One-vs-rest on the arg-max: class 0 TP 1 FP 1 FN 0 TN 2 (P 1/2, R 1, F1 2/3, BAcc (1+2/3)/2);
  # class 1 TP 1 FP 0 FN 1 TN 2 (P 1, R 1/2, F1 2/3, BAcc 3/4); class 2 all right (1, 1, 1, 1).
  assert out["Precision"] == pytest.approx((0.5 + 1 + 1) / 3)
  assert out["Recall"] == pytest.approx((1 + 0.5 + 1) / 3)
  assert out["F1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
  assert out["BAcc"] == pytest.approx((5 / 6 + 3 / 4 + 1) / 3)
  # AP: classes 0 and 2 rank their positive first (1); class 1 scores .6(+) .3(-) .2(+) .1(-):
  # (1 + 2/3)/2 = 5/6. AUROC class 1: pairs (.6>.3 ✓, .6>.1 ✓, .2>.3 ✗, .2>.1 ✓) = 3/4.
  assert out["mAP"] == pytest.approx((1 + 5 / 6 + 1) / 3)
  assert out["AUROC"] == pytest.approx((1 + 3 / 4 + 1) / 3)
  assert out["classes_evaluated"] == 3 and out["classes_skipped"] == 0
  with pytest.raises(ValueError, match="one-hot"):
    metrics.singlelabel_metrics(probs, np.array([[1, 1, 0]] * 4))


def test_class_prior_predicts_the_most_frequent_training_class():
  train = one_hot([2, 2, 1, 0, 2], 3)
  test = one_hot([2, 0, 1, 2], 3)
  out = get_task("singlelabel").prior_baseline(train, test)
  assert out["Accuracy"] == pytest.approx(0.5)  # always class 2
  assert out["mAP"] == pytest.approx((1 / 4 + 1 / 4 + 2 / 4) / 3)  # constant scores: positive rate


def test_softmax_head_and_cross_entropy():
  task = get_task("singlelabel")
  logits = np.array([[np.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(np.asarray(task.probabilities(logits))[0], [0.6, 0.2, 0.2],
                             rtol=1e-6)
  soft = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], np.float32)
  loss = np.asarray(task.supervised_loss(logits, soft, np.ones(3, np.float32)))
  np.testing.assert_allclose(loss, [-np.log(0.6), np.log(3.0)], rtol=1e-6)
  assert task.headline_metric == "Accuracy" and task.num_outputs(10) == 10


# --- noise ---------------------------------------------------------------------------------------

def test_pair_noise_flips_exactly_int_rate_n_to_the_next_class():
  classes = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  clients = [np.arange(0, 7), np.arange(7, 10)]
  noisy, corrupted = corrupt_single_labels(one_hot(classes, 3), clients, np.array([0.3, 0.5]),
                                           "pair", np.random.default_rng(0))
  assert corrupted[:7].sum() == 2 and corrupted[7:].sum() == 1  # int(0.3·7), int(0.5·3)
  new = noisy.argmax(1)
  np.testing.assert_array_equal(new[corrupted], (classes[corrupted] + 1) % 3)
  np.testing.assert_array_equal(new[~corrupted], classes[~corrupted])
  assert noisy.dtype == np.uint8 and np.all(noisy.sum(1) == 1)
  np.testing.assert_array_equal(pair_flip(np.array([0, 1, 2, 3]), 4), [1, 2, 3, 0])


def test_symmetric_noise_exact_counts_other_class_uniform():
  rng = np.random.default_rng(1)
  classes = rng.integers(0, 4, 3000)
  clients = [np.arange(0, 1000), np.arange(1000, 2500), np.arange(2500, 2990)]  # 10 in no client
  rates = np.array([0.2, 0.4, 0.0])
  noisy, corrupted = corrupt_single_labels(one_hot(classes, 4), clients, rates, "symmetric",
                                           np.random.default_rng(2))
  assert [int(corrupted[idx].sum()) for idx in clients] == [200, 600, 0]
  assert not corrupted[2990:].any()
  new = noisy.argmax(1)
  assert np.all(new[corrupted] != classes[corrupted])
  np.testing.assert_array_equal(new[~corrupted], classes[~corrupted])
  # Each wrong class about equally likely: offsets 1, 2, 3 each about 1/3 of the 800 flips.
  offsets = np.bincount((new[corrupted] - classes[corrupted]) % 4, minlength=4)
  assert offsets[0] == 0 and np.all(np.abs(offsets[1:] / 800 - 1 / 3) < 0.06)
  flips = symmetric_flip(np.zeros(500, np.int64), 2, np.random.default_rng(0))
  assert np.all(flips == 1)  # two classes: the only other class


def test_instance_flip_distribution_by_hand():
  # True class 0: its logit is excluded; softmax over classes 1, 2 of (ln 3, 0) = (3/4, 1/4).
  dist = instance_flip_distribution(np.array([[5.0, np.log(3.0), 0.0]]), np.array([0]),
                                    np.array([0.4]))
  np.testing.assert_allclose(dist, [[0.6, 0.3, 0.1]])


def test_truncated_normal_stays_in_range():
  draws = truncated_normal(0.05, 0.1, 20000, np.random.default_rng(0))
  assert draws.min() >= 0.0 and draws.max() <= 1.0
  # Mean of N(0.05, 0.1²) on [0, 1]: 0.05 + 0.1·φ(0.5)/Φ(0.5) = 0.05 + 0.1·0.3521/0.6915 ≈ 0.1009.
  assert draws.mean() == pytest.approx(0.1009, abs=0.002)


def test_instance_noise_rates_average_near_target_and_depend_on_the_image():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (4000, 6, 6, 1), dtype=np.uint8)
  classes = rng.integers(0, 5, 4000)
  clients = [np.arange(0, 2000), np.arange(2000, 3500), np.arange(3500, 4000)]
  rates = np.array([0.3, 0.45, 0.0])
  noisy, corrupted = corrupt_single_labels(one_hot(classes, 5), clients, rates, "instance",
                                           np.random.default_rng(4), images=images)
  realised = [corrupted[idx].mean() for idx in clients]
  assert realised[0] == pytest.approx(0.3, abs=0.03)
  assert realised[1] == pytest.approx(0.45, abs=0.03)
  assert realised[2] == 0.0  # a clean client stays clean
  np.testing.assert_array_equal(noisy.argmax(1) == classes, ~corrupted)
  # The same images and seed give the same labels.
  again, _ = corrupt_single_labels(one_hot(classes, 5), clients, rates, "instance",
                                   np.random.default_rng(4), images=images)
  np.testing.assert_array_equal(noisy, again)
  with pytest.raises(ValueError, match="images"):
    corrupt_single_labels(one_hot(classes, 5), clients, rates, "instance", rng)


def test_heterogeneous_client_rates_follow_fedcorr():
  rates = client_noise_rates(200, 0.0, 0.4, 0.5, np.random.default_rng(7))
  reference = np.random.default_rng(7)
  noisy = reference.random(200) < 0.4
  level = 0.5 + 0.5 * reference.random(200)
  np.testing.assert_array_equal(rates, np.where(noisy, level, 0.0))
  assert np.all((rates == 0) | ((rates >= 0.5) & (rates < 1.0)))
  assert 0.3 < np.mean(rates > 0) < 0.5
  np.testing.assert_array_equal(client_noise_rates(3, 0.2, None, 0.5, None), [0.2] * 3)
  with pytest.raises(ConfigError, match="noise_rate = 0"):
    client_noise_rates(3, 0.2, 0.4, 0.5, np.random.default_rng(0))
  with pytest.raises(ConfigError, match="min_client_noise"):
    client_noise_rates(3, 0.0, 0.4, 1.0, np.random.default_rng(0))


def test_simulate_clients_single_label_heterogeneous():
  y = one_hot(np.random.default_rng(5).integers(0, 4, 403), 4)
  data = simulate_clients(y, num_clients=8, noise_rate=0.0, annotation_num=4, seed=11,
                          noise_type="symmetric", noisy_client_fraction=0.5, min_client_noise=0.3)
  expected_rates = client_noise_rates(8, 0.0, 0.5, 0.3, stream(11, STREAM_CLIENT_RATES))
  np.testing.assert_array_equal(data.client_noise_rates, expected_rates)
  for idx, rate in zip(data.client_indices, data.client_noise_rates):
    assert data.corrupted[idx].sum() == int(rate * idx.size)
  assert data.annotated.all()
  np.testing.assert_array_equal(data.observed_labels, data.noisy_labels)
  # Which clients are noisy does not depend on the noise type.
  pair = simulate_clients(y, 8, 0.0, 4, seed=11, noise_type="pair", noisy_client_fraction=0.5,
                          min_client_noise=0.3)
  np.testing.assert_array_equal(pair.client_noise_rates, data.client_noise_rates)


def test_simulate_clients_single_label_errors():
  y = one_hot(np.arange(40) % 4, 4)
  with pytest.raises(ConfigError, match="annotate every class"):
    simulate_clients(y, 2, 0.2, 3, noise_type="symmetric")
  with pytest.raises(DataError, match="exactly one positive"):
    simulate_clients(np.ones((40, 4)), 2, 0.2, 4, noise_type="pair")
  with pytest.raises(ConfigError, match="single-label noise types only"):
    simulate_clients(y, 2, 0.0, 4, noisy_client_fraction=0.5)
  with pytest.raises(ConfigError, match="noise_type"):
    simulate_clients(y, 2, 0.2, 4, noise_type="asymmetric")


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    ({"labels.noise_type": "multilabel_instance"}, "a multilabel noise type"),
    ({"method": "fednml"},
     r"support 'singlelabel' are \['fedavg', 'fedelc', 'fednoro', 'fedprox', 'maskedoptim'\]"),
    ({"method": "fedavg", "compare": "fedavg,fednml"}, "'fednml' does not support"),
    ({"data.source": "embedded"}, "embedded_digits"),
    ({"labels.noisy_client_fraction": 0.4}, "noise_rate = 0"),
    ({"labels.noise_rate": 0.0, "labels.noisy_client_fraction": 1.5}, r"in \[0, 1\]"),
])
def test_singlelabel_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(single_label_config(**overrides))


@pytest.mark.parametrize("overrides, match", [
    ({"labels.noise_type": "symmetric"}, "a singlelabel noise type"),
    ({"labels.noise_type": "pair", "labels.noise_rate": 0.0}, "multilabel_instance"),
    ({"labels.noise_rate": 0.0, "labels.noisy_client_fraction": 0.5}, "task = 'singlelabel'"),
])
def test_multilabel_rejects_single_label_noise(overrides, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(tiny_config(**overrides))


def test_noise_type_defaults_per_task():
  config_lib.validate(single_label_config(**{"labels.noise_type": None}))
  assert config_lib.noise_type(single_label_config(**{"labels.noise_type": None})) == "symmetric"
  assert config_lib.noise_type(tiny_config()) == "multilabel_instance"


def test_build_federation_requires_all_classes_annotated():
  from fednml_jax import train
  from fednml_jax.data import load_dataset
  config = single_label_config(**{"labels.annotation_num": 7})
  with pytest.raises(ConfigError, match="must be the number of classes, 10"):
    train.build_federation(config, load_dataset(config.data), get_task("singlelabel"), 1)


def test_select_best_uses_the_given_metric():
  from fednml_jax.train import _select_best
  history = {0: {"val": {"mAP": 0.9, "Accuracy": 0.5}}, 1: {"val": {"mAP": 0.8, "Accuracy": 0.6}}}
  assert _select_best(history, "val") == 0
  assert _select_best(history, "val", "Accuracy") == 1


# --- end to end ----------------------------------------------------------------------------------

def test_fedavg_on_embedded_single_digits(tmp_path):
  from fednml_jax import train
  config = single_label_config(**{"labels.noise_type": "instance", "labels.noise_rate": 0.3})
  summary = train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "summary.json") as f:
    saved = json.load(f)
  assert saved["dataset"] == "single_digits" and saved["annotation_num"] == 10
  for block in ("test_final", "test_at_best_val", "val_at_best", "test_class_prior"):
    for key in ("Accuracy", "mAP", "F1", "Recall", "BAcc", "Precision", "AUROC"):
      assert isinstance(saved[block][key], float), (block, key)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  val_accuracy = {r["round"]: r["metrics"]["Accuracy"] for r in records if r["split"] == "val"}
  assert sorted(val_accuracy) == [0, 1]
  assert summary["best_val_round"] == max(sorted(val_accuracy), key=val_accuracy.get)
  assert summary["test_class_prior"]["Accuracy"] == pytest.approx(0.1)  # balanced test classes
