"""Simulating federated clients with noisy and missing labels (ALGORITHMS.md §1).

Pure numpy; every random draw comes from an explicit `np.random.Generator`. `simulate_clients` runs
the whole pipeline the way the reference does: partition → noise (on every client's data) → missing
classes masked per client, with three independent streams derived from one seed.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from fednml_jax.corruption.missing import draw_annotated_classes, mask_missing_classes
from fednml_jax.corruption.noise import (_check_noise_rate, corrupt_labels, flip_distribution,
                                         flip_probabilities, label_prior, soft_labels,
                                         true_label_probability)
from fednml_jax.corruption.partition import (DEFAULT_MIN_SIZE, _as_binary_labels,
                                             dirichlet_partition, iid_partition, primary_classes)
from fednml_jax.errors import ConfigError

__all__ = [
    "CorruptedData", "simulate_clients", "iid_partition", "dirichlet_partition", "primary_classes",
    "corrupt_labels", "label_prior", "soft_labels", "true_label_probability", "flip_probabilities",
    "flip_distribution", "draw_annotated_classes", "mask_missing_classes", "PARTITIONS",
    "stream", "STREAM_PARTITION", "STREAM_NOISE", "STREAM_MISSING",
]

PARTITIONS = ("iid", "dirichlet")
# Stream ids: the generator for a stage is `default_rng(SeedSequence([seed, STREAM_...]))`.
STREAM_PARTITION = 0
STREAM_NOISE = 1
STREAM_MISSING = 2


@dataclasses.dataclass(frozen=True)
class CorruptedData:
  """The simulated federation over one training split (arrays are read-only).

  client_indices: per client, sorted int64 indices into the training split; disjoint. Samples in no
    client (the IID remainder) keep their labels but are never trained on.
  clean_labels: (N, C) the original labels.
  noisy_labels: (N, C) after the noise, before masking (same dtype as the input).
  observed_labels: (N, C) after noise and masking: what the clients train on.
  corrupted: bool (N,), the samples drawn for corruption (ground truth for diagnostics).
  annotated: bool (K, C), the classes each client annotates.
  """
  client_indices: list[np.ndarray]
  clean_labels: np.ndarray
  noisy_labels: np.ndarray
  observed_labels: np.ndarray
  corrupted: np.ndarray
  annotated: np.ndarray

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  @property
  def num_classes(self) -> int:
    return self.clean_labels.shape[1]

  def client_labels(self, k: int) -> np.ndarray:
    """Client k's observed (noisy, masked) labels, in the order of `client_indices[k]` (a copy)."""
    return self.observed_labels[self.client_indices[k]]


def stream(seed: int, stream_id: int) -> np.random.Generator:
  """The generator of one pipeline stage: independent of the other stages' streams."""
  return np.random.default_rng(np.random.SeedSequence([seed, stream_id]))


def simulate_clients(train_labels: np.ndarray, num_clients: int, noise_rate: float,
                     annotation_num: int, partition: str = "iid", dirichlet_alpha: float = 1.0,
                     seed: int = 0) -> CorruptedData:
  """Partition → instance-dependent noise → missing classes, as ALGORITHMS.md §1 specifies.

  `partition` is "iid" (equal sizes, remainder dropped) or "dirichlet" (label skew with
  `dirichlet_alpha`, every client at least `DEFAULT_MIN_SIZE` samples). The three stages draw from
  `stream(seed, STREAM_PARTITION / STREAM_NOISE / STREAM_MISSING)`, so e.g. changing `noise_rate`
  changes neither the partition nor the annotated classes.
  """
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
  if partition not in PARTITIONS:
    raise ConfigError(f"partition must be one of {PARTITIONS}, got {partition!r}.")
  clean = np.asarray(train_labels).copy()
  n, num_classes = _as_binary_labels(clean).shape
  _check_noise_rate(noise_rate)  # fail on config before any work
  annotated = draw_annotated_classes(num_classes, num_clients, annotation_num,
                                     stream(seed, STREAM_MISSING))
  if partition == "iid":
    clients = iid_partition(n, num_clients, stream(seed, STREAM_PARTITION))
  else:
    clients = dirichlet_partition(clean, num_clients, dirichlet_alpha,
                                  stream(seed, STREAM_PARTITION), min_size=DEFAULT_MIN_SIZE)
  noisy, corrupted = corrupt_labels(clean, clients, noise_rate, stream(seed, STREAM_NOISE))
  observed = mask_missing_classes(noisy, clients, annotated)
  for array in (*clients, clean, noisy, observed, corrupted, annotated):
    array.flags.writeable = False
  return CorruptedData(client_indices=clients, clean_labels=clean, noisy_labels=noisy,
                       observed_labels=observed, corrupted=corrupted, annotated=annotated)
