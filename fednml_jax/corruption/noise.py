"""Instance-dependent multi-label noise (ALGORITHMS.md §1 "Label noise").

Implements the reference `utils_/noise.py::add_noise` (`n_type == "instance"`), step by step:

1. `prior = mean(Y_train, 0)`, normalised to sum 1, over ALL training labels (`label_prior`).
2. Per sample `s ~ Dirichlet(0.1·1_C)`, `+0.5/|pos|` at each positive, normalise,
   `s = 0.7·s + 0.3·prior` (`soft_labels`).
3. `p_true` = mean of `s` over the positives (over all classes if none); `p_flip ∝ 1 − p_true`
   (`true_label_probability`, `flip_probabilities`).
4. Exactly `int(noise_rate·n_k)` samples per client, drawn without replacement with `p_flip`.
5. For each drawn sample: `s` at the positives times 0.2, renormalised (`flip_distribution`);
   `m = randint(1, max(2, min(max_pos, C)))` (high exclusive, `max_pos` = most positives on any
   training image); `m` distinct classes drawn from that distribution replace the whole label
   vector.

Randomness. `corrupt_labels` spawns one child generator per client from the generator it is given
(`Generator.spawn`, i.e. `SeedSequence` spawning), so client k's draws depend only on the parent's
seed and on k: adding, removing or re-partitioning other clients leaves client k's draws unchanged
(its soft labels still see the global prior and `max_pos`, which are properties of the data). The
reference instead threads one global `np.random` stream through the clients in order. Within a
client the stream is consumed as: the `(n_k, C)` Dirichlet draws, the choice of noisy samples, the
`m`s, then Gumbel keys for the classes.

Deliberate deviations from the reference, none of which changes the distribution on real data:
* the `m` classes are drawn with the Gumbel-top-k trick: exactly sequential weighted sampling
  without replacement (what `np.random.choice(..., replace=False, p=...)` does), but vectorised;
* guards where the reference would crash: if fewer samples than needed have `p_flip > 0`, all of
  those are taken and the rest drawn uniformly among the others (all-zero → uniform); `m` is capped
  at the number of classes with non-zero probability; an all-negative training set gets a uniform
  prior.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from fednml_jax.corruption.partition import _as_binary_labels, _check_client_indices
from fednml_jax.errors import ConfigError

DIRICHLET_CONCENTRATION = 0.1
POSITIVE_BOOST = 0.5
SOFT_WEIGHT = 0.7  # the prior gets 1 - SOFT_WEIGHT = 0.3
POSITIVE_DAMPING = 0.2


def label_prior(labels: np.ndarray) -> np.ndarray:
  """Class frequencies `mean(Y, 0)` normalised to sum 1; uniform if there is no positive at all."""
  labels = np.asarray(labels, np.float64)
  freq = labels.mean(axis=0) if labels.shape[0] else np.zeros(labels.shape[1])
  total = freq.sum()
  if total <= 0:
    return np.full(labels.shape[1], 1.0 / labels.shape[1])
  return freq / total


def soft_labels(labels: np.ndarray, prior: np.ndarray, dirichlet_draws: np.ndarray) -> np.ndarray:
  """Step 2 given the Dirichlet draws: boost positives by `0.5/|pos|`, normalise, mix with prior.

  labels (n, C) multi-hot, prior (C,), dirichlet_draws (n, C) rows on the simplex. Returns (n, C).
  """
  labels = np.asarray(labels, bool)
  num_pos = labels.sum(axis=1, keepdims=True)
  boost = np.where(labels, POSITIVE_BOOST / np.maximum(num_pos, 1), 0.0)
  s = np.asarray(dirichlet_draws, np.float64) + boost
  s = s / s.sum(axis=1, keepdims=True)
  return SOFT_WEIGHT * s + (1.0 - SOFT_WEIGHT) * np.asarray(prior, np.float64)[None, :]


def true_label_probability(soft: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Step 3's `p_true`: the mean of `soft` over each row's positives, over all classes if none."""
  labels = np.asarray(labels, bool)
  soft = np.asarray(soft, np.float64)
  num_pos = labels.sum(axis=1)
  on_positives = (soft * labels).sum(axis=1) / np.maximum(num_pos, 1)
  return np.where(num_pos > 0, on_positives, soft.mean(axis=1))


def flip_probabilities(soft: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Step 3's `p_flip = (1 − p_true) / Σ(1 − p_true)` over one client's samples.

  If every sample has `p_true == 1` (only possible in degenerate data, e.g. C = 1) the weights are
  all zero and the result is uniform instead.
  """
  weight = np.clip(1.0 - true_label_probability(soft, labels), 0.0, None)
  total = weight.sum()
  if total <= 0:
    return np.full(weight.shape, 1.0 / max(weight.size, 1))
  return weight / total


def flip_distribution(soft: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Step 5's class distribution: `soft` with the positives multiplied by 0.2, renormalised."""
  s = np.where(np.asarray(labels, bool), POSITIVE_DAMPING, 1.0) * np.asarray(soft, np.float64)
  return s / s.sum(axis=1, keepdims=True)


def draw_noisy_samples(p_flip: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """`count` distinct positions drawn with probabilities `p_flip` (step 4), sorted.

  Guard: if fewer than `count` positions have non-zero weight, all of them are taken and the rest
  are drawn uniformly among the zero-weight positions.
  """
  p_flip = np.asarray(p_flip, np.float64)
  if count == 0:
    return np.zeros(0, np.int64)
  nonzero = np.flatnonzero(p_flip > 0)
  if nonzero.size >= count:
    chosen = rng.choice(p_flip.size, size=count, replace=False, p=p_flip / p_flip.sum())
  else:
    zero = np.flatnonzero(p_flip <= 0)
    chosen = np.concatenate([nonzero, rng.choice(zero, size=count - nonzero.size, replace=False)])
  return np.sort(chosen).astype(np.int64)


def sample_classes(probs: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Row i gets `counts[i]` distinct classes drawn without replacement from `probs[i]`.

  Gumbel-top-k: the `k` largest of `log p + Gumbel` are distributed exactly as `k` successive
  draws without replacement with renormalisation (`np.random.choice(..., replace=False, p=p)`).
  Counts above the number of non-zero-probability classes are capped there. Returns bool (n, C).
  """
  probs = np.asarray(probs, np.float64)
  counts = np.minimum(np.asarray(counts, np.int64), (probs > 0).sum(axis=1))
  with np.errstate(divide="ignore"):
    keys = np.log(probs) + rng.gumbel(size=probs.shape)
  order = np.argsort(-keys, axis=1, kind="stable")
  rank = np.argsort(order, axis=1)  # rank[i, c] = position of class c in row i's ordering
  return rank < counts[:, None]


def corrupt_labels(labels: np.ndarray, client_indices: Sequence[np.ndarray], noise_rate: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Instance-dependent label noise per client (ALGORITHMS.md §1; reference `add_noise`).

  Args:
    labels: (N, C) multi-hot labels of the WHOLE training split; the prior and `max_pos` come from
      all of it, including samples that belong to no client.
    client_indices: one int array of indices into `labels` per client; disjoint.
    noise_rate: in [0, 1); client k gets exactly `int(noise_rate · n_k)` corrupted samples (the
      reference's `int(...)`, float rounding included).
    rng: parent generator; one child per client is spawned from it (see the module docstring).

  Returns:
    `(noisy_labels, corrupted)`: noisy labels with the dtype of `labels` (a copy; samples outside
    every client are unchanged), and the bool (N,) mask of the samples that were drawn for
    corruption. A drawn sample's new label can by chance equal its old one; it is still marked.
  """
  noise_rate = _check_noise_rate(noise_rate)
  original = np.asarray(labels)
  clean = _as_binary_labels(original)
  n, num_classes = clean.shape
  client_indices = _check_client_indices(client_indices, n)
  noisy = original.copy()
  corrupted = np.zeros(n, bool)
  if noise_rate == 0 or not client_indices:
    return noisy, corrupted

  prior = label_prior(clean)
  max_pos = int(clean.sum(axis=1).max()) if n else 0
  m_high = max(2, min(max_pos, num_classes))  # exclusive, as np.random.randint(1, m_high)
  alpha = np.full(num_classes, DIRICHLET_CONCENTRATION)

  for idx, client_rng in zip(client_indices, _spawn(rng, len(client_indices))):
    count = int(noise_rate * idx.size)
    if count == 0:
      continue
    y = clean[idx]
    soft = soft_labels(y, prior, client_rng.dirichlet(alpha, size=idx.size))
    chosen = draw_noisy_samples(flip_probabilities(soft, y), count, client_rng)
    m = client_rng.integers(1, m_high, size=chosen.size)
    new = sample_classes(flip_distribution(soft[chosen], y[chosen]), m, client_rng)
    noisy[idx[chosen]] = new.astype(noisy.dtype)
    corrupted[idx[chosen]] = True
  return noisy, corrupted


def _check_noise_rate(noise_rate) -> float:
  if isinstance(noise_rate, bool) or not isinstance(noise_rate, numbers.Real) \
      or not 0.0 <= noise_rate < 1.0:
    raise ConfigError(f"noise_rate must be a number in [0, 1) (the fraction of each client's "
                      f"samples whose labels are corrupted), got {noise_rate!r}.")
  return float(noise_rate)


def _spawn(rng: np.random.Generator, count: int) -> list[np.random.Generator]:
  """`count` independent child generators; child k does not depend on `count`."""
  try:
    return rng.spawn(count)
  except TypeError:  # a bit generator whose seed sequence cannot spawn (legacy seeding)
    base = np.random.SeedSequence(rng.integers(0, 2**63, size=4).tolist())
    return [np.random.default_rng(s) for s in base.spawn(count)]
