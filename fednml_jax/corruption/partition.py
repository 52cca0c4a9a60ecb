"""Splitting the training set across clients (ALGORITHMS.md §1).

`iid_partition` is the reference's `MuReD_iid` (`src/sampling.py`): every client gets `n // K`
samples drawn at random without replacement and the remainder is dropped. The reference draws the
clients one after another with `np.random.choice`; a single permutation cut into `K` blocks has the
same distribution and is simpler.

`dirichlet_partition` is the usual label-skew split (Hsu et al. 2019, "Measuring the effects of
non-identical data distribution"), adapted to multi-hot labels; see its docstring.

The private helpers at the bottom validate the arguments the three corruption modules share.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from fednml_jax.errors import ConfigError, DataError

DEFAULT_MIN_SIZE = 10
DEFAULT_MAX_TRIES = 1000


def iid_partition(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Equal-size random partition of `range(num_samples)` into `num_clients` disjoint parts.

  Each client gets `num_samples // num_clients` indices (sorted, int64); the
  `num_samples % num_clients` left over belong to no client, as in the reference `MuReD_iid`.
  """
  num_samples = _check_count(num_samples, "num_samples", minimum=0)
  num_clients = _check_num_clients(num_clients, num_samples)
  per_client = num_samples // num_clients
  order = rng.permutation(num_samples)
  return [np.sort(order[k * per_client:(k + 1) * per_client]).astype(np.int64)
          for k in range(num_clients)]


def primary_classes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """For each sample, one of its positive classes picked uniformly; `C` ("no finding") if none.

  Returns an int64 array of shape (N,) with values in `0..C`.
  """
  labels = _as_binary_labels(labels)
  n, c = labels.shape
  # A uniform key per entry, kept only on positives: the arg-max is a uniform random positive.
  keys = np.where(labels, rng.random((n, c)), -1.0)
  primary = np.argmax(keys, axis=1) if c else np.zeros(n, np.int64)
  has_positive = labels.any(axis=1)
  return np.where(has_positive, primary, c).astype(np.int64)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        rng: np.random.Generator, min_size: int = DEFAULT_MIN_SIZE,
                        max_tries: int = DEFAULT_MAX_TRIES) -> list[np.ndarray]:
  """Non-IID label-skew partition of multi-label data; every sample goes to exactly one client.

  1. Each sample gets a *primary class*: a uniformly random one of its positives, or the extra
     pseudo-class "no finding" (index `C`) when it has none (`primary_classes`). Drawn once.
  2. For every primary class, its samples are shuffled and cut among the `K` clients in proportions
     drawn from `Dirichlet(alpha·1_K)` (the standard per-class Dirichlet split).
  3. Step 2 is redrawn until every client holds at least `min_size` samples, at most `max_tries`
     times; then a `ConfigError` says which knob to turn.

  Small `alpha` gives each client few dominant classes; large `alpha` approaches an IID split.
  Unlike `iid_partition`, nothing is dropped and client sizes differ. Returns sorted int64 index
  arrays, one per client.
  """
  labels = _as_binary_labels(labels)
  n = labels.shape[0]
  num_clients = _check_num_clients(num_clients, n)
  alpha = _check_positive_float(alpha, "dirichlet_alpha")
  min_size = _check_count(min_size, "min_size", minimum=0)
  max_tries = _check_count(max_tries, "max_tries", minimum=1)
  if min_size * num_clients > n:
    raise ConfigError(
        f"dirichlet_partition cannot give each of {num_clients} clients at least min_size="
        f"{min_size} samples from only {n} training samples; lower min_size to at most "
        f"{n // num_clients} or use fewer clients.")

  primary = primary_classes(labels, rng)
  groups = [np.flatnonzero(primary == j) for j in range(labels.shape[1] + 1)]
  groups = [g for g in groups if g.size]
  smallest = 0
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members in groups:
      members = rng.permutation(members)
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
      for k, chunk in enumerate(np.split(members, cuts)):
        parts[k].append(chunk)
    sizes = [sum(chunk.size for chunk in p) for p in parts]
    smallest = min(sizes)
    if smallest >= min_size:
      return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
              for p in parts]
  raise ConfigError(
      f"dirichlet_partition found no split of {n} samples over {num_clients} clients with "
      f"dirichlet_alpha={alpha} in which every client has at least min_size={min_size} samples "
      f"({max_tries} tries; the last one's smallest client had {smallest}). Raise dirichlet_alpha "
      f"(less skew), lower min_size, or use fewer clients.")


# --- validation shared by the corruption modules -------------------------------------------------

def _check_count(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_num_clients(num_clients, num_samples: int) -> int:
  if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) \
      or num_clients < 1:
    raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}; set it to the "
                      f"number of federated clients to simulate.")
  if num_clients > num_samples:
    raise ConfigError(f"num_clients={num_clients} is more than the {num_samples} training samples "
                      f"to share among them; every client needs at least one sample, so use at "
                      f"most {num_samples} clients.")
  return int(num_clients)


def _check_positive_float(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) \
      or not np.isfinite(value) or value <= 0:
    raise ConfigError(f"{name} must be a finite number > 0, got {value!r}.")
  return float(value)


def _as_binary_labels(labels) -> np.ndarray:
  """The (N, C) label matrix as a bool array; `DataError` if it is not multi-hot."""
  array = np.asarray(labels)
  if array.ndim != 2:
    raise DataError(f"Training labels must be an (N, C) multi-hot matrix, got shape {array.shape}; "
                    f"check how the dataset's label file was read.")
  if array.size and not np.isin(array, (0, 1)).all():
    raise DataError("Training labels must contain only 0 and 1 (multi-hot), but other values were "
                    "found; check the dataset's label file or the class filtering.")
  return array.astype(bool)


def _check_client_indices(client_indices: Sequence[np.ndarray], num_samples: int
                          ) -> list[np.ndarray]:
  """Client index arrays as int64, in range and disjoint (a sample is in at most one client)."""
  result = []
  for k, idx in enumerate(client_indices):
    idx = np.asarray(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
      raise ValueError(f"client_indices[{k}] must be a 1-D integer array, got {idx.dtype} "
                       f"of shape {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_samples):
      raise ValueError(f"client_indices[{k}] has indices outside 0..{num_samples - 1}")
    result.append(idx)
  if result:
    everything = np.concatenate(result)
    if np.unique(everything).size != everything.size:
      raise ValueError("client_indices overlap or repeat a sample; each training sample must "
                       "belong to at most one client")
  return result
