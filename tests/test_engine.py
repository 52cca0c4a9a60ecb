"""The federated engine: batching semantics, strategies agreeing, compile-once, aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax import aggregation, train
from fednml_jax.engine import local_training
from fednml_jax.engine.clients import ClientLayout

from conftest import tiny_config


def test_batch_plan_visits_each_sample_once_per_epoch_and_pads_with_zero_weight():
  valid = jnp.array([True] * 5 + [False] * 3)  # 5 real samples, 3 padding slots
  slots, weights = local_training.batch_plan(jax.random.PRNGKey(0), valid, 5, local_epochs=2,
                                             batch_size=2)
  # ceil(8 / 2) = 4 steps per epoch: [2, 2, 1 real + 1 filler, 0 real + 2 fillers].
  assert slots.shape == (8, 2) and weights.shape == (8, 2)
  np.testing.assert_array_equal(np.asarray(weights[:4]), [[1, 1], [1, 1], [1, 0], [0, 0]])
  for epoch in range(2):
    s = np.asarray(slots[4 * epoch:4 * epoch + 4])
    w = np.asarray(weights[4 * epoch:4 * epoch + 4])
    assert sorted(s[w > 0].tolist()) == [0, 1, 2, 3, 4]  # each real sample exactly once
    assert (s < 5).all()  # fillers are real samples too, never padding slots
  # Epoch orders differ.
  assert not np.array_equal(np.asarray(slots[:2]), np.asarray(slots[4:6]))


def test_weighted_mean_by_hand():
  stacked = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]])}
  # weights 1, 3 and a padding client of weight 0: (1·[1,2] + 3·[3,6]) / 4 = [2.5, 5].
  out = aggregation.weighted_mean(stacked, jnp.array([1.0, 3.0, 0.0]))
  np.testing.assert_allclose(out["w"], [2.5, 5.0])
  np.testing.assert_array_equal(aggregation.client_weights(jnp.array([10, 30, 0]), "uniform"),
                                [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(
      aggregation.client_weights(jnp.array([10, 30, 0]), "sample_count"), [10.0, 30.0, 0.0])


def test_client_layout_pads_samples_and_clients():
  layout = ClientLayout.from_indices([np.array([4, 7, 9]), np.array([1, 2])], pad_clients_to=4)
  assert layout.num_clients == 4 and layout.num_real_clients == 2 and layout.slots == 3
  np.testing.assert_array_equal(layout.counts, [3, 2, 0, 0])
  np.testing.assert_array_equal(layout.valid[1], [True, True, False])
  per_image = np.arange(10) * 10
  np.testing.assert_array_equal(layout.gather(per_image, fill=-1)[:2], [[40, 70, 90], [10, 20, -1]])


def _final_params(strategy, tmp_path, **overrides):
  cfg = tiny_config(**{"fl.strategy": strategy, "rounds": 2, **overrides})
  summary = train.train_and_evaluate(cfg, str(tmp_path / strategy))
  return summary


@pytest.mark.parametrize("strategy", ["vmap", "shard"])
def test_strategies_agree_with_loop(tmp_path, strategy):
  """vmap (one program), shard (clients over 2 devices) and loop compute the same run."""
  assert jax.device_count() == 2, "conftest sets two CPU devices"
  loop = _final_params("loop", tmp_path)
  other = _final_params(strategy, tmp_path)
  for key in ("mAP", "AUROC", "BAcc"):
    assert other["test_final"][key] == pytest.approx(loop["test_final"][key], abs=2e-3)


def test_shard_with_uneven_clients_pads_and_ignores_padding_client(tmp_path):
  # 3 real clients over 2 devices: one padding client of weight 0 must not change the result.
  loop = _final_params("loop", tmp_path)
  shard = _final_params("shard", tmp_path)
  assert shard["num_clients"] == 3
  assert shard["test_final"]["mAP"] == pytest.approx(loop["test_final"]["mAP"], abs=2e-3)


def test_programs_compile_once_per_run(tmp_path):
  """Rounds reuse the compiled program: the trace count does not grow with the number of rounds."""
  short = train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path / "one"))
  long = train.train_and_evaluate(tiny_config(rounds=3), str(tmp_path / "three"))
  assert short["compiled_programs"] == long["compiled_programs"]


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
  a = train.train_and_evaluate(tiny_config(), str(tmp_path / "a"))
  b = train.train_and_evaluate(tiny_config(), str(tmp_path / "b"))
  c = train.train_and_evaluate(tiny_config(seed=1), str(tmp_path / "c"))
  assert a["test_final"] == b["test_final"]
  assert a["test_final"] != c["test_final"]
