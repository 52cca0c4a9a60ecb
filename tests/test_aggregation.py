"""Robust aggregators (geometric median, coordinate median, trimmed mean, Krum, DaAgg), the
`config.aggregation` switch, and FedProx: hand-worked numbers, padding clients ignored, jit."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fednml_jax import aggregation
from fednml_jax.config import VALID_CHOICES, base_config, validate
from fednml_jax.errors import ConfigError
from fednml_jax.methods import METHODS
from fednml_jax.methods.base import Method
from fednml_jax.methods.fedprox import FedProx, proximal_term


def numpy_weiszfeld(points, weights, iters, eps=1e-5):
  """Reference weighted Weiszfeld in float64 numpy, from the weighted mean, no early stop."""
  points = np.asarray(points, np.float64)
  weights = np.asarray(weights, np.float64)
  z = weights @ points / weights.sum()
  for _ in range(iters):
    beta = weights / np.maximum(np.linalg.norm(points - z, axis=1), eps)
    z = beta @ points / beta.sum()
  return z


# Geometric median -----------------------------------------------------------------------------
def test_geometric_median_of_a_right_triangle_is_its_fermat_point():
  # (0,0), (1,0), (0,1): every angle < 120°, so the median is the Fermat point, on y = x by
  # symmetry: at (t, t) the three unit vectors sum to 0. The x-component gives
  # −1/√2 + (1 − 2t)/√((1 − t)² + t²) = 0  ⇒  2(1 − 2t)² = 1 − 2t + 2t²  ⇒  6t² − 6t + 1 = 0,
  # t = (3 − √3)/6 ≈ 0.211325.
  t = (3 - math.sqrt(3)) / 6
  points = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
  np.testing.assert_allclose(numpy_weiszfeld(points, [1, 1, 1], 1000), [t, t], atol=1e-9)
  out = aggregation.geometric_median({"x": jnp.array(points)}, jnp.ones(3))["x"]
  # Weiszfeld converges linearly here: 10 iterations from the mean (1/3, 1/3) land within 2e-3
  # (measured 1.6e-3), and agree with the float64 reference's 10 iterations to float32 precision.
  np.testing.assert_allclose(out, [t, t], atol=2e-3)
  np.testing.assert_allclose(out, numpy_weiszfeld(points, [1, 1, 1], 10), atol=1e-6)


def test_geometric_median_collinear_is_the_middle_point_and_ignores_padding():
  # 1-D points 0, 1, 10 (equal weights): Σ|z − x_k| is minimised at the middle point 1 (the mean,
  # 11/3, is dragged towards the outlier). Weiszfeld converges quadratically near a data point
  # (distance floored at eps) and stops once a step moves less than eps = 1e-5.
  stacked = {"x": jnp.array([[0.0], [1.0], [10.0], [-1e6]])}  # the last client is padding
  out = aggregation.geometric_median(stacked, jnp.array([1.0, 1.0, 1.0, 0.0]))["x"]
  np.testing.assert_allclose(out, [1.0], atol=1e-5)


def test_geometric_median_is_per_tensor_and_weighted():
  # Leaf "a": collinear as above; leaf "b": the triangle. Each leaf gets its own median.
  stacked = {"a": jnp.array([[0.0], [1.0], [10.0]]),
             "b": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])}
  out = aggregation.geometric_median(stacked, jnp.ones(3))
  np.testing.assert_allclose(out["a"], [1.0], atol=1e-5)
  np.testing.assert_allclose(out["b"], numpy_weiszfeld(stacked["b"], [1, 1, 1], 10), atol=1e-6)
  # Weighted: 0, 1, 10 with weights 1, 1, 5. The point 10 carries more than half the weight, so the
  # weighted median is 10 itself. Weiszfeld approaches it only linearly here (10 iterations: 9.9996;
  # the eps floor puts the limit at 9.999996), so: within 1e-3, and equal to the reference's steps.
  weights = [1.0, 1.0, 5.0]
  weighted = aggregation.geometric_median({"a": stacked["a"]}, jnp.array(weights))["a"]
  np.testing.assert_allclose(weighted, [10.0], atol=1e-3)
  np.testing.assert_allclose(weighted, numpy_weiszfeld(stacked["a"], weights, 10), atol=1e-5)


# Coordinate median and trimmed mean ----------------------------------------------------------
def test_coordinate_median_odd_and_even_with_padding():
  pad = [100.0, -100.0, 0.0]  # weight 0: must be ignored
  values = jnp.array([[1.0, 5.0, -2.0], [3.0, 1.0, 0.0], [2.0, 9.0, 4.0], pad])
  out = aggregation.coordinate_median({"x": values}, jnp.array([10.0, 20.0, 30.0, 0.0]))["x"]
  # Columns over the 3 real clients: {1,3,2} → 2, {5,1,9} → 5, {−2,0,4} → 0 (weights unused).
  np.testing.assert_array_equal(out, [2.0, 5.0, 0.0])
  values = jnp.array([[1.0, 5.0, -2.0], [3.0, 1.0, 0.0], [2.0, 9.0, 4.0], [10.0, 2.0, 1.0], pad])
  out = aggregation.coordinate_median({"x": values}, jnp.array([1.0, 1.0, 1.0, 1.0, 0.0]))["x"]
  # Even count: mean of the two middle values: {1,2,3,10} → 2.5, {1,2,5,9} → 3.5, {−2,0,1,4} → 0.5.
  np.testing.assert_array_equal(out, [2.5, 3.5, 0.5])


def test_trimmed_mean_drops_extremes_of_real_clients_only():
  values = jnp.array([[1.0, -50.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0], [4.0, 3.0],
                      [-1000.0, 1000.0]])  # last: padding
  weights = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
  # K_real = 5, trim 0.2 → b = floor(0.2·5) = 1 per side:
  # column 0: {1,2,100,3,4} → drop 1 and 100 → (2+3+4)/3 = 3; column 1: drop −50, 3 → (0+1+2)/3 = 1.
  out = aggregation.trimmed_mean({"x": values}, weights, trim_fraction=0.2)["x"]
  np.testing.assert_allclose(out, [3.0, 1.0], rtol=1e-6)
  # trim 0.1 → b = floor(0.5) = 0: the unweighted mean of the 5 real clients, (110/5, −44/5).
  out = aggregation.trimmed_mean({"x": values}, weights, trim_fraction=0.1)["x"]
  np.testing.assert_allclose(out, [22.0, -8.8], rtol=1e-6)
  with pytest.raises(ValueError):
    aggregation.trimmed_mean({"x": values}, weights, trim_fraction=0.5)


def test_trim_count_is_exact():
  # floor(f·n) with f read as a fraction: 0.1·10 = 1 (not 0.999… → 0), 0.3·10 = 3, 0.35·20 = 7.
  for f, n, b in [(0.1, 10, 1), (0.1, 9, 0), (0.3, 10, 3), (0.2, 5, 1), (0.35, 20, 7), (0.0, 7, 0),
                  (0.49, 100, 49)]:
    assert int(aggregation._trim_count(f, jnp.int32(n))) == b, (f, n)
  # Ten real clients, trim 0.1: the single largest and smallest values go.
  values = jnp.arange(10.0).at[9].set(1000.0).reshape(10, 1)
  out = aggregation.trimmed_mean({"x": values}, jnp.ones(10), trim_fraction=0.1)["x"]
  np.testing.assert_allclose(out, [sum(range(1, 9)) / 8], rtol=1e-6)


# Krum ----------------------------------------------------------------------------------------
def krum_clients():
  # 2-D points split over two leaves (x in "a", y in "b"), so the distance is over the whole model.
  points = np.array([[0.2, 0.1], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [50.0, 50.0],
                     [1.0, 0.0]])  # last: a padding client sitting on client 1
  return {"a": jnp.array(points[:, :1]), "b": jnp.array(points[:, 1:])}, points


def test_krum_picks_the_central_inlier_and_ignores_padding():
  stacked, _ = krum_clients()
  weights = jnp.array([5.0, 1.0, 1.0, 1.0, 1.0, 0.0])
  # K_real = 5, f = 1 → m = 5 − 1 − 2 = 2 nearest others. Squared distances:
  # c0–c1 0.65, c0–c2 0.85, c0–c3 1.45, c1–c2 2, c1–c3 4, c2–c3 2, anything–c4 > 4000.
  # Scores: c0 = 0.65 + 0.85 = 1.5, c1 = 0.65 + 2 = 2.65, c2 = 0.85 + 2 = 2.85,
  # c3 = 1.45 + 2 = 3.45.
  # (Counting the padding client, c1 would score 0 + 0.65 and win.)
  out = aggregation.krum(stacked, weights, num_byzantine=1)
  np.testing.assert_array_equal(out["a"], stacked["a"][0])  # client 0's variables, bit for bit
  np.testing.assert_array_equal(out["b"], stacked["b"][0])


def test_krum_falls_back_to_the_weighted_mean_for_few_clients():
  stacked, _ = krum_clients()
  # Three real clients, f = 1: m = 0 < 1, no neighbourhood to score → weighted mean.
  weights = jnp.array([1.0, 1.0, 2.0, 0.0, 0.0, 0.0])
  out = aggregation.krum(stacked, weights, num_byzantine=1)
  expected = aggregation.weighted_mean(stacked, weights)
  np.testing.assert_allclose(out["a"], expected["a"])
  np.testing.assert_allclose(out["b"], expected["b"])
  np.testing.assert_allclose(out["a"], [(0.2 + 1.0 + 0.0) / 4])


# DaAgg ---------------------------------------------------------------------------------------
def daagg_clients():
  # Two leaves: "a" of shape (2,), "b" of shape (1,). Distance = ‖Δa‖ + ‖Δb‖.
  a = jnp.array([[0.0, 0.0], [6.0, 8.0], [6.0, 4.0], [6.0, 4.0]])
  b = jnp.array([[0.0], [0.0], [1.0], [1.0]])
  return {"a": a, "b": b}


def test_daagg_weights_by_hand():
  stacked = daagg_clients()
  counts = jnp.array([1.0, 2.0, 1.0, 0.0])  # client 3 is padding (a copy of client 2)
  noisy = jnp.array([False, False, True, False])  # padding marked clean: must still be ignored
  # Clean: c0, c1. Noisy: c2. d_2 = min(‖(6,4)‖ + 1, ‖(0,−4)‖ + 1) = min(√52 + 1, 5) = 5
  # (counting the padding "clean" copy it would be 0 and DaAgg would fall back to the mean).
  # d = (0, 0, 5), max d = 5 → w' ∝ (1·e⁰, 2·e⁰, 1·e⁻¹) = (1, 2, e⁻¹), Σ = 3 + e⁻¹ ≈ 3.367879.
  # a = (1·(0,0) + 2·(6,8) + e⁻¹·(6,4)) / (3 + e⁻¹) = (12 + 6/e, 16 + 4/e) / (3 + 1/e)
  #   ≈ (14.207277, 17.471518) / 3.367879 ≈ (4.218464, 5.187691); b = e⁻¹ / (3 + e⁻¹) ≈ 0.109232.
  e = math.exp(-1)
  out = aggregation.daagg(stacked, counts, noisy)
  np.testing.assert_allclose(out["a"], [(12 + 6 * e) / (3 + e), (16 + 4 * e) / (3 + e)], rtol=1e-6)
  np.testing.assert_allclose(out["a"], [4.218464, 5.187691], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [e / (3 + e)], rtol=1e-6)


def test_daagg_normalises_by_the_largest_distance():
  # c0 clean (weight 2); c1 noisy at distance ‖(3,4)‖ + 0 = 5; c2 noisy at 0 + ‖(10)‖ = 10.
  # d = (0, 5, 10), max 10 → w' ∝ (2, e^−0.5, e^−1).
  stacked = {"a": jnp.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]),
             "b": jnp.array([[0.0], [0.0], [10.0]])}
  out = aggregation.daagg(stacked, jnp.array([2.0, 1.0, 1.0]), jnp.array([False, True, True]))
  w = np.array([2.0, math.exp(-0.5), math.exp(-1.0)])
  w = w / w.sum()
  np.testing.assert_allclose(out["a"], w[1] * np.array([3.0, 4.0]), rtol=1e-6)
  np.testing.assert_allclose(out["b"], [w[2] * 10.0], rtol=1e-6)


@pytest.mark.parametrize("case", ["no noisy client", "no clean real client", "max d = 0"])
def test_daagg_falls_back_to_the_weighted_mean(case):
  stacked = daagg_clients()
  counts = jnp.array([1.0, 2.0, 1.0, 0.0])
  if case == "no noisy client":
    noisy = [False, False, False, False]
  elif case == "no clean real client":
    noisy = [True, True, True, False]  # the padding client, marked clean, must not count as clean
  else:
    # The only noisy client c1 sits exactly on the clean c0: d = (0, 0, 0), max d = 0.
    noisy = [False, True, False, False]
    stacked = {"a": stacked["a"].at[1].set(stacked["a"][0]), "b": stacked["b"].at[1].set(0.0)}
  out = aggregation.daagg(stacked, counts, jnp.array(noisy))
  expected = aggregation.weighted_mean(stacked, counts)
  np.testing.assert_allclose(out["a"], expected["a"], rtol=1e-6)
  np.testing.assert_allclose(out["b"], expected["b"], rtol=1e-6)


# Every aggregator: structure, shapes, dtypes, jit, padding --------------------------------------
def model_like_clients(num_clients=5, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"params": {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
                       "dense": {"kernel": (4, 3), "bias": (3,)}},
            "batch_stats": {"bn": {"mean": (4,), "var": (4,)}}}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=(num_clients,) + s), jnp.float32),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


ALL_RULES = {
    **{name: (lambda n: lambda s, w: aggregation.aggregate_by_name(n, s, w))(name)
       for name in aggregation.AGGREGATORS},
    "daagg": lambda s, w: aggregation.daagg(s, w, jnp.array([False, True, False, False, True])),
}


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_every_aggregator_keeps_structure_under_jit_and_ignores_padding(name):
  stacked = model_like_clients()
  stacked["params"]["dense"]["bias"] = stacked["params"]["dense"]["bias"].astype(jnp.bfloat16)
  weights = jnp.array([3.0, 1.0, 2.0, 4.0, 0.0])  # client 4 is padding
  rule = ALL_RULES[name]
  out = jax.jit(rule)(stacked, weights)
  assert jax.tree.structure(out) == jax.tree.structure(stacked)
  for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(stacked)):
    assert got.shape == leaf.shape[1:] and got.dtype == leaf.dtype
    assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
  # Eager and jitted agree; moving the padding client anywhere changes nothing.
  eager = rule(stacked, weights)
  moved = jax.tree.map(lambda x: x.at[4].set(1e4), stacked)
  for a, b, c in zip(jax.tree.leaves(out), jax.tree.leaves(eager),
                     jax.tree.leaves(rule(moved, weights))):
    # bfloat16 leaves: the weighted mean's bf16 arithmetic may round differently when fused.
    tol = dict(rtol=1e-2, atol=1e-2) if a.dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(b, np.float32), **tol)


def test_identical_clients_are_a_fixed_point_of_every_aggregator():
  one = jax.tree.map(lambda x: x[0], model_like_clients())
  stacked = jax.tree.map(lambda x: jnp.stack([x] * 5), one)
  weights = jnp.array([1.0, 2.0, 3.0, 4.0, 0.0])
  for name, rule in ALL_RULES.items():
    for got, want in zip(jax.tree.leaves(rule(stacked, weights)), jax.tree.leaves(one)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


# Names, options, config ------------------------------------------------------------------------
def test_aggregate_by_name_routes_options():
  stacked = {"x": jnp.array([[0.0], [1.0], [2.0], [3.0], [100.0]])}
  w = jnp.ones(5)
  options = dict(trim_fraction=0.2, num_byzantine=1, geometric_median_iters=3)
  trimmed = aggregation.aggregate_by_name("trimmed_mean", stacked, w, **options)["x"]
  np.testing.assert_allclose(trimmed, [2.0])  # b = floor(0.2·5) = 1: drops 0 and 100
  np.testing.assert_array_equal(aggregation.aggregate_by_name("mean", stacked, w, **options)["x"],
                                aggregation.weighted_mean(stacked, w)["x"])
  np.testing.assert_allclose(
      aggregation.aggregate_by_name("geometric_median", stacked, w, **options)["x"],
      aggregation.geometric_median(stacked, w, iters=3)["x"])
  with pytest.raises(ValueError, match="unknown aggregator"):
    aggregation.aggregate_by_name("daagg", stacked, w)
  with pytest.raises(ValueError, match="unknown aggregation option"):
    aggregation.aggregate_by_name("mean", stacked, w, iters=3)


def test_config_choices_match_the_registry_and_are_validated():
  assert VALID_CHOICES["aggregation"] == tuple(aggregation.AGGREGATORS)
  c = base_config()
  assert c.aggregation == "mean"
  assert c.aggregation_options.to_dict() == {"trim_fraction": 0.1, "num_byzantine": 1,
                                             "geometric_median_iters": 10}
  assert c.fedprox.mu == 0.01
  validate(c)
  bad = [("aggregation", "median"), ("aggregation_options.trim_fraction", 0.5),
         ("aggregation_options.trim_fraction", -0.1), ("aggregation_options.num_byzantine", -1),
         ("aggregation_options.geometric_median_iters", 0)]
  for key, value in bad:
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
      validate(tiny_config(**{key: value}))
  # Krum with f = 1 needs at least 4 clients.
  with pytest.raises(ConfigError, match="num_clients"):
    validate(tiny_config(aggregation="krum", **{"fl.num_clients": 3}))
  validate(tiny_config(aggregation="krum", **{"fl.num_clients": 4}))


def test_method_aggregate_follows_config():
  stacked = model_like_clients()
  clients = {"count": jnp.array([30, 10, 20, 40, 0])}
  setup = types.SimpleNamespace(task=None)
  for name in aggregation.AGGREGATORS:
    for rule in ("sample_count", "uniform"):
      config = tiny_config(aggregation=name, **{"fl.client_weighting": rule})
      got = Method(config, setup).aggregate(stacked, clients, None)
      weights = aggregation.client_weights(clients["count"], rule)
      want = aggregation.aggregate_by_name(name, stacked, weights,
                                           **config.aggregation_options.to_dict())
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
  # The default is exactly the weighted mean by sample count (the behaviour before this switch).
  got = Method(base_config(), setup).aggregate(stacked, clients, None)
  want = aggregation.weighted_mean(stacked, clients["count"])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)


# FedProx ---------------------------------------------------------------------------------------
def test_fedprox_penalty_by_hand():
  params = {"dense": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "bias": jnp.array([0.5])}}
  global_params = {"dense": {"kernel": jnp.array([[1.0, 0.0], [3.0, 1.0]]),
                             "bias": jnp.array([-0.5])}}
  # Δ kernel = [[0, 2], [0, 3]] → 4 + 9 = 13; Δ bias = [1] → 1; ‖Δ‖² = 14; μ/2·‖Δ‖² = 0.25·14 = 3.5.
  assert float(proximal_term(params, global_params, 0.5)) == pytest.approx(3.5)
  config = tiny_config(method="fedprox", **{"fedprox.mu": 0.5})
  method = METHODS["fedprox"](config, types.SimpleNamespace(task=None))
  assert isinstance(method, FedProx) and method.name == "fedprox"
  value, grad = jax.value_and_grad(
      lambda p: method.penalty("train", params=p, global_params=global_params, client={},
                               scalars={}, epoch_step=0))(params)
  assert float(value) == pytest.approx(3.5)
  # ∇ = μ·Δ.
  np.testing.assert_allclose(grad["dense"]["kernel"], [[0.0, 1.0], [0.0, 1.5]])
  np.testing.assert_allclose(grad["dense"]["bias"], [0.5])
  assert float(method.penalty("train", params=params, global_params=params, client={},
                             scalars={}, epoch_step=0)) == 0.0
  with pytest.raises(ConfigError, match="fedprox.mu"):
    FedProx(tiny_config(**{"fedprox.mu": -1.0}), types.SimpleNamespace(task=None))


# Smoke runs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(method="fedprox"),
                                       dict(aggregation="geometric_median")])
def test_one_round_smoke(tmp_path, overrides):
  from fednml_jax import train
  summary = train.train_and_evaluate(tiny_config(rounds=1, **overrides), str(tmp_path))
  assert summary["method"] == overrides.get("method", "fedavg")
  assert math.isfinite(summary["test_final"]["mAP"])
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["aggregation"] == overrides.get("aggregation", "mean")
