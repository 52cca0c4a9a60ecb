"""Tests for fednml_jax.corruption: partition, instance-dependent noise, missing classes."""

import numpy as np
import pytest

from fednml_jax.corruption import (CorruptedData, corrupt_labels, dirichlet_partition,
                                   draw_annotated_classes, flip_distribution, flip_probabilities,
                                   iid_partition, label_prior, mask_missing_classes,
                                   primary_classes, simulate_clients, soft_labels,
                                   true_label_probability)
from fednml_jax.corruption.noise import draw_noisy_samples, sample_classes
from fednml_jax.errors import ConfigError, DataError


def random_labels(n, c, p=0.2, seed=0, max_pos=None):
  rng = np.random.default_rng(seed)
  y = (rng.random((n, c)) < p).astype(np.float32)
  if max_pos is not None:  # keep at most max_pos positives per row, and make one row reach it
    for i in range(n):
      pos = np.flatnonzero(y[i])
      y[i, pos[max_pos:]] = 0
    y[0] = 0
    y[0, :max_pos] = 1
  return y


# --- partition -----------------------------------------------------------------------------------

def test_iid_partition_sizes_disjoint_sorted_remainder_dropped():
  parts = iid_partition(23, 4, np.random.default_rng(0))
  assert [p.size for p in parts] == [5, 5, 5, 5]
  everything = np.concatenate(parts)
  assert np.unique(everything).size == 20  # disjoint, 3 left over
  assert everything.min() >= 0 and everything.max() < 23
  for p in parts:
    assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_iid_partition_deterministic_and_seed_dependent():
  a = iid_partition(100, 5, np.random.default_rng(1))
  b = iid_partition(100, 5, np.random.default_rng(1))
  c = iid_partition(100, 5, np.random.default_rng(2))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("num_clients", [0, -1, 11, True, 2.5])
def test_iid_partition_bad_num_clients(num_clients):
  with pytest.raises(ConfigError):
    iid_partition(10, num_clients, np.random.default_rng(0))


def test_primary_classes_picks_a_positive_or_no_finding():
  y = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
  counts = np.zeros((3, 4), int)
  rng = np.random.default_rng(0)
  for _ in range(2000):
    counts[np.arange(3), primary_classes(y, rng)] += 1
  assert counts[0].tolist() == [2000, 0, 0, 0]
  assert counts[2].tolist() == [0, 0, 0, 2000]
  assert counts[1, 0] == 0 and counts[1, 3] == 0
  assert abs(counts[1, 1] / 2000 - 0.5) < 0.05  # uniform among the positives


def _label_skew(labels, parts):
  """Mean total-variation distance between each client's class mix and the global one."""
  glob = labels.sum(0) / labels.sum()
  tv = [0.5 * np.abs(labels[p].sum(0) / max(labels[p].sum(), 1) - glob).sum() for p in parts]
  return float(np.mean(tv))


def test_dirichlet_partition_disjoint_covering_min_size():
  y = random_labels(600, 6, seed=3)
  parts = dirichlet_partition(y, 8, 0.5, np.random.default_rng(0), min_size=20)
  everything = np.concatenate(parts)
  assert np.array_equal(np.sort(everything), np.arange(600))  # disjoint and covering
  assert min(p.size for p in parts) >= 20
  for p in parts:
    assert np.all(np.diff(p) > 0)
  again = dirichlet_partition(y, 8, 0.5, np.random.default_rng(0), min_size=20)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_partition_skew_grows_as_alpha_shrinks():
  y = random_labels(2000, 6, seed=4)
  skew = {alpha: np.mean([_label_skew(y, dirichlet_partition(y, 10, alpha,
                                                             np.random.default_rng(s), min_size=5))
                          for s in range(5)])
          for alpha in (0.1, 1.0, 100.0)}
  assert skew[0.1] > skew[1.0] > skew[100.0]
  assert skew[100.0] < 0.05


def test_dirichlet_partition_errors():
  y = random_labels(100, 4)
  rng = np.random.default_rng(0)
  for alpha in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ConfigError, match="dirichlet_alpha"):
      dirichlet_partition(y, 4, alpha, rng)
  with pytest.raises(ConfigError, match="min_size"):
    dirichlet_partition(y, 10, 1.0, rng, min_size=11)  # 10 x 11 > 100
  with pytest.raises(ConfigError, match="tries"):  # feasible in principle, never found
    dirichlet_partition(y, 10, 0.01, rng, min_size=10, max_tries=20)
  with pytest.raises(ConfigError):
    dirichlet_partition(y, 101, 1.0, rng, min_size=0)
  with pytest.raises(DataError):
    dirichlet_partition(np.full((10, 2), 2), 2, 1.0, rng, min_size=0)


# --- noise: the building blocks, with hand-worked numbers ----------------------------------------

def test_label_prior():
  y = np.array([[1, 0, 1], [1, 1, 0]])
  np.testing.assert_allclose(label_prior(y), [0.5, 0.25, 0.25])  # mean [1, .5, .5] / 2
  np.testing.assert_allclose(label_prior(np.zeros((3, 4))), [0.25] * 4)


def test_soft_labels_hand_worked():
  prior = np.array([1 / 3, 1 / 3, 1 / 3])
  y = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
  draws = np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5], [0.5, 0.0, 0.5]])
  # Row 0: +0.25 on both positives -> [.45, .55, .5] / 1.5 = [.3, .36667, .33333]; 0.7 s + 0.1.
  # Row 1: no positive -> 0.7 * draws + 0.1.
  # Row 2: +0.5 on class 0 -> [1, 0, .5] / 1.5 -> 0.7 * [2/3, 0, 1/3] + 0.1.
  expected = [[0.31, 0.7 * 0.55 / 1.5 + 0.1, 0.7 * 0.5 / 1.5 + 0.1],
              [0.24, 0.31, 0.45],
              [0.7 * 2 / 3 + 0.1, 0.1, 0.7 / 3 + 0.1]]
  out = soft_labels(y, prior, draws)
  np.testing.assert_allclose(out, expected)
  np.testing.assert_allclose(out.sum(1), 1.0)


def test_true_and_flip_probabilities_hand_worked():
  soft = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
  y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_allclose(true_label_probability(soft, y), [0.5, 0.35, 1 / 3])
  # 1 - p_true = [30, 39, 40] / 60, which sum to 109 / 60.
  np.testing.assert_allclose(flip_probabilities(soft, y), np.array([30, 39, 40]) / 109)


def test_flip_probabilities_all_true_falls_back_to_uniform():
  soft = np.ones((4, 1))  # C = 1: every p_true is 1
  y = np.array([[1], [0], [1], [1]])
  np.testing.assert_allclose(flip_probabilities(soft, y), [0.25] * 4)


def test_flip_distribution_hand_worked():
  soft = np.array([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
  y = np.array([[1, 0, 0], [0, 0, 0]])
  # [0.1, 0.3, 0.2] / 0.6; a row without positives is unchanged.
  np.testing.assert_allclose(flip_distribution(soft, y), [[1 / 6, 1 / 2, 1 / 3], [0.25, 0.25, 0.5]])


def test_sample_classes_matches_sequential_sampling_without_replacement():
  rng = np.random.default_rng(0)
  trials = 20000
  probs = np.tile([0.5, 0.3, 0.2], (trials, 1))
  two = sample_classes(probs, np.full(trials, 2), rng)
  assert np.all(two.sum(1) == 2)
  freq = {pair: np.mean(two[:, pair[0]] & two[:, pair[1]]) for pair in ((0, 1), (0, 2), (1, 2))}
  # P({0,1}) = .5*.3/.5 + .3*.5/.7; P({0,2}) = .5*.2/.5 + .2*.5/.8; the rest for {1,2}.
  assert abs(freq[(0, 1)] - (0.3 + 0.15 / 0.7)) < 0.015
  assert abs(freq[(0, 2)] - (0.2 + 0.1 / 0.8)) < 0.015
  assert abs(freq[(1, 2)] - (0.06 / 0.7 + 0.06 / 0.8)) < 0.015
  one = sample_classes(probs, np.ones(trials, int), rng)
  np.testing.assert_allclose(one.mean(0), [0.5, 0.3, 0.2], atol=0.015)
  # Counts above the number of non-zero classes are capped; zero-probability classes never drawn.
  capped = sample_classes(np.array([[0.0, 0.4, 0.6, 0.0]]), np.array([3]), rng)
  assert capped.tolist() == [[False, True, True, False]]


def test_draw_noisy_samples_follows_p_flip_and_guards_zero_weights():
  rng = np.random.default_rng(0)
  p = np.array([0.7, 0.1, 0.1, 0.1])
  hits = np.bincount(np.concatenate([draw_noisy_samples(p, 1, rng) for _ in range(5000)]),
                     minlength=4)
  np.testing.assert_allclose(hits / 5000, p, atol=0.03)
  for _ in range(20):
    chosen = draw_noisy_samples(np.array([0.5, 0.5, 0.0, 0.0]), 3, rng)
    assert chosen.size == 3 and {0, 1} <= set(chosen.tolist())
  assert draw_noisy_samples(p, 0, rng).size == 0


# --- noise: corrupt_labels -----------------------------------------------------------------------

def test_exact_count_per_client():
  y = random_labels(30, 5, seed=1)
  clients = [np.arange(0, 10), np.arange(10, 20), np.arange(20, 30)]
  noisy, corrupted = corrupt_labels(y, clients, 0.25, np.random.default_rng(0))
  assert [int(corrupted[c].sum()) for c in clients] == [2, 2, 2]  # int(0.25 * 10)
  noisy0, corrupted0 = corrupt_labels(y, clients, 0.0, np.random.default_rng(0))
  assert not corrupted0.any() and np.array_equal(noisy0, y)
  # int(noise_rate * n_k) literally, as the reference: 0.29 * 100 = 28.999... -> 28.
  y100 = random_labels(100, 5, seed=2)
  _, c29 = corrupt_labels(y100, [np.arange(100)], 0.29, np.random.default_rng(0))
  assert c29.sum() == int(0.29 * 100) == 28


def test_corrupted_labels_positives_range_and_clean_ones_unchanged():
  y = random_labels(400, 6, p=0.4, seed=5, max_pos=4)  # max_pos = 4 -> m in 1..3
  assert y.sum(1).max() == 4
  clients = [np.arange(0, 150), np.arange(150, 300)]  # 300..399 belong to no client
  noisy, corrupted = corrupt_labels(y, clients, 0.6, np.random.default_rng(0))
  assert noisy.dtype == y.dtype and noisy is not y
  assert corrupted.sum() == 180
  npos = noisy[corrupted].sum(1)
  assert npos.min() >= 1 and npos.max() <= 3
  assert set(np.unique(npos).tolist()) == {1, 2, 3}
  assert np.array_equal(noisy[~corrupted], y[~corrupted])
  assert not corrupted[300:].any()
  assert set(np.unique(noisy).tolist()) <= {0.0, 1.0}


def test_single_positive_data_flips_to_one_class():
  y = np.eye(4)[np.arange(40) % 4]  # max_pos = 1 -> m = randint(1, 2) = 1
  noisy, corrupted = corrupt_labels(y, [np.arange(40)], 0.5, np.random.default_rng(0))
  assert np.all(noisy[corrupted].sum(1) == 1)
  # Positives are damped to 0.2, so most corrupted samples change class.
  assert np.mean(np.any(noisy[corrupted] != y[corrupted], axis=1)) > 0.5


def test_degenerate_single_class_and_no_positives():
  y = np.array([[1], [0], [1], [1], [0], [1]])
  noisy, corrupted = corrupt_labels(y, [np.arange(6)], 0.5, np.random.default_rng(0))
  assert corrupted.sum() == 3 and np.all(noisy[corrupted] == 1)
  y0 = np.zeros((10, 3))  # no positives anywhere: uniform prior, m = 1
  noisy0, corrupted0 = corrupt_labels(y0, [np.arange(10)], 0.5, np.random.default_rng(0))
  assert corrupted0.sum() == 5 and np.all(noisy0[corrupted0].sum(1) == 1)


def test_noise_prefers_samples_with_low_p_true():
  # Half the samples have one positive of eight (E[p_true] = 0.7 * (1/8 + 1/2) / 1.5 + 0.3/8
  # ~ 0.33), half have four (E[p_true] ~ 0.7 * (1/8 + 1/8) / 1.5 + 0.3/8 ~ 0.154). p_flip is
  # proportional to 1 - p_true, so a single draw hits the second half with probability about
  # 0.846 / (0.846 + 0.67) ~ 0.56: the noise is only mildly instance-dependent, by design of the
  # reference. Over 200 seeds the share's standard error is ~0.005.
  c = 8
  single = np.eye(c)[np.arange(100) % c]
  multi = np.zeros((100, c))
  for i in range(100):
    multi[i, (np.arange(4) + i) % c] = 1
  y = np.concatenate([single, multi])
  share = []
  for seed in range(200):
    _, corrupted = corrupt_labels(y, [np.arange(200)], 0.25, np.random.default_rng(seed))
    share.append(corrupted[100:].sum() / corrupted.sum())
  assert 0.53 < np.mean(share) < 0.59


def test_steps_1_to_4_match_a_loop_over_samples():
  """A per-sample loop shaped like the reference, on the same documented stream, picks the same
  samples: the vectorised soft labels and p_flip agree with the loop."""
  y = random_labels(60, 5, p=0.3, seed=7)
  clients = [np.arange(0, 25), np.arange(25, 60)]
  parent = np.random.default_rng(11)
  _, corrupted = corrupt_labels(y, clients, 0.4, parent)
  children = np.random.default_rng(11).spawn(2)
  prior = y.mean(0) / y.mean(0).sum()
  for idx, child in zip(clients, children):
    draws = child.dirichlet(np.full(5, 0.1), size=idx.size)
    p_t = []
    for j, i in enumerate(idx):
      pos = np.flatnonzero(y[i] == 1)
      s = draws[j].copy()
      for p in pos:
        s[p] += 0.5 / len(pos)
      s = 0.7 * s / s.sum() + 0.3 * prior
      p_t.append(np.mean(s[pos]) if pos.size else np.mean(s))
    p_f = 1 - np.array(p_t)
    chosen = child.choice(idx.size, size=int(0.4 * idx.size), replace=False, p=p_f / p_f.sum())
    assert set(idx[chosen].tolist()) == set(np.flatnonzero(corrupted[idx]) + idx[0])


def test_noise_deterministic_and_seed_dependent():
  y = random_labels(100, 5, seed=8)
  clients = iid_partition(100, 4, np.random.default_rng(0))
  a = corrupt_labels(y, clients, 0.4, np.random.default_rng(3))
  b = corrupt_labels(y, clients, 0.4, np.random.default_rng(3))
  c = corrupt_labels(y, clients, 0.4, np.random.default_rng(4))
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_noise_per_client_independence():
  y = random_labels(90, 5, seed=9)
  c0, c1, c1_other = np.arange(0, 30), np.arange(30, 60), np.arange(60, 90)
  runs = [corrupt_labels(y, clients, 0.4, np.random.default_rng(5))
          for clients in ([c0, c1], [c0, c1_other], [c0], [c0, c1, c1_other])]
  for noisy, corrupted in runs[1:]:
    assert np.array_equal(corrupted[c0], runs[0][1][c0])
    assert np.array_equal(noisy[c0], runs[0][0][c0])
  # A third client leaves the second one's draw unchanged too.
  assert np.array_equal(runs[3][1][c1], runs[0][1][c1])


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), True, "0.2"])
def test_noise_rate_out_of_range(rate):
  with pytest.raises(ConfigError, match="noise_rate"):
    corrupt_labels(np.zeros((4, 2)), [np.arange(4)], rate, np.random.default_rng(0))


def test_noise_rejects_overlapping_clients_and_non_binary_labels():
  with pytest.raises(ValueError, match="overlap"):
    corrupt_labels(np.zeros((4, 2)), [np.arange(3), np.arange(2, 4)], 0.5,
                   np.random.default_rng(0))
  with pytest.raises(DataError):
    corrupt_labels(np.full((4, 2), 0.5), [np.arange(4)], 0.5, np.random.default_rng(0))


# --- missing classes -----------------------------------------------------------------------------

def test_mask_missing_classes_hand_worked():
  y = np.ones((5, 3), np.float32)
  clients = [np.array([0, 1]), np.array([2, 3])]  # sample 4 belongs to no client
  annotated = np.array([[True, False, True], [False, True, False]])
  out = mask_missing_classes(y, clients, annotated)
  assert out.tolist() == [[1, 0, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0], [1, 1, 1]]
  assert out.dtype == np.float32 and y.sum() == 15  # input untouched


def test_mask_keeps_annotated_entries_and_zeroes_the_rest():
  y = random_labels(200, 7, p=0.4, seed=10)
  clients = iid_partition(200, 5, np.random.default_rng(0))
  annotated = draw_annotated_classes(7, 5, 3, np.random.default_rng(1))
  out = mask_missing_classes(y, clients, annotated)
  for idx, keep in zip(clients, annotated):
    assert np.array_equal(out[np.ix_(idx, keep)], y[np.ix_(idx, keep)])
    assert not out[np.ix_(idx, ~keep)].any()


def test_draw_annotated_classes_counts_uniformity_nesting():
  annotated = draw_annotated_classes(6, 3000, 2, np.random.default_rng(0))
  assert annotated.shape == (3000, 6) and annotated.dtype == bool
  assert np.all(annotated.sum(1) == 2)
  np.testing.assert_allclose(annotated.mean(0), 2 / 6, atol=0.03)
  small = draw_annotated_classes(6, 50, 2, np.random.default_rng(7))
  large = draw_annotated_classes(6, 50, 4, np.random.default_rng(7))
  assert np.all(large[small])  # same rng state: more annotations are a superset
  assert draw_annotated_classes(6, 4, 6, np.random.default_rng(0)).all()


@pytest.mark.parametrize("annotation_num", [0, 7, -1, 2.0])
def test_draw_annotated_classes_range_error(annotation_num):
  with pytest.raises(ConfigError, match="1 to 6"):
    draw_annotated_classes(6, 3, annotation_num, np.random.default_rng(0))


# --- the pipeline --------------------------------------------------------------------------------

def test_simulate_clients_pipeline():
  y = random_labels(103, 6, p=0.3, seed=12)
  data = simulate_clients(y, num_clients=4, noise_rate=0.4, annotation_num=4, seed=3)
  assert isinstance(data, CorruptedData)
  assert data.num_clients == 4 and data.num_classes == 6
  assert [c.size for c in data.client_indices] == [25] * 4
  assert data.corrupted.sum() == 4 * 10
  assert np.array_equal(data.clean_labels, y)
  assert np.array_equal(data.noisy_labels[~data.corrupted], y[~data.corrupted])
  assert np.array_equal(data.observed_labels,
                        mask_missing_classes(data.noisy_labels, data.client_indices,
                                             data.annotated))
  assert np.all(data.annotated.sum(1) == 4)
  # The 3 left-over samples keep their labels everywhere.
  rest = np.setdiff1d(np.arange(103), np.concatenate(data.client_indices))
  assert rest.size == 3
  for labels in (data.noisy_labels, data.observed_labels):
    assert np.array_equal(labels[rest], y[rest])
  assert not data.corrupted[rest].any()
  np.testing.assert_array_equal(data.client_labels(1), data.observed_labels[data.client_indices[1]])
  with pytest.raises(ValueError):
    data.observed_labels[0, 0] = 1  # read-only


def test_simulate_clients_determinism_and_stream_independence():
  y = random_labels(200, 6, p=0.3, seed=13)
  a = simulate_clients(y, 5, 0.4, 3, seed=1)
  b = simulate_clients(y, 5, 0.4, 3, seed=1)
  for field in ("clean_labels", "noisy_labels", "observed_labels", "corrupted", "annotated"):
    assert np.array_equal(getattr(a, field), getattr(b, field))
  assert all(np.array_equal(x, z) for x, z in zip(a.client_indices, b.client_indices))
  c = simulate_clients(y, 5, 0.4, 3, seed=2)
  assert not np.array_equal(a.corrupted, c.corrupted)
  assert not np.array_equal(a.annotated, c.annotated)
  # Changing the noise rate changes neither the partition nor the annotated classes.
  d = simulate_clients(y, 5, 0.2, 3, seed=1)
  assert all(np.array_equal(x, z) for x, z in zip(a.client_indices, d.client_indices))
  assert np.array_equal(a.annotated, d.annotated)
  e = simulate_clients(y, 5, 0.0, 3, seed=1)
  assert not e.corrupted.any() and np.array_equal(e.noisy_labels, y)


def test_simulate_clients_dirichlet():
  y = random_labels(400, 5, p=0.3, seed=14)
  data = simulate_clients(y, 6, 0.2, 5, partition="dirichlet", dirichlet_alpha=0.5, seed=0)
  assert np.array_equal(np.sort(np.concatenate(data.client_indices)), np.arange(400))
  assert min(c.size for c in data.client_indices) >= 10
  assert data.corrupted.sum() == sum(int(0.2 * c.size) for c in data.client_indices)
  assert np.array_equal(data.observed_labels, data.noisy_labels)  # annotation_num = C


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition="shards"), "partition"),
    (dict(seed=-1), "seed"),
    (dict(noise_rate=1.0), "noise_rate"),
    (dict(annotation_num=0), "annotation_num"),
    (dict(annotation_num=7), "annotation_num"),
    (dict(num_clients=0), "num_clients"),
    (dict(num_clients=51), "num_clients"),
    (dict(partition="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha"),
])
def test_simulate_clients_config_errors(kwargs, match):
  args = dict(num_clients=2, noise_rate=0.2, annotation_num=3, partition="iid",
              dirichlet_alpha=1.0, seed=0)
  args.update(kwargs)
  with pytest.raises(ConfigError, match=match):
    simulate_clients(random_labels(50, 6), **args)
