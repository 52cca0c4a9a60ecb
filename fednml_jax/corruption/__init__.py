"""Simulating federated clients with noisy and missing labels (ALGORITHMS.md §1).

Pure numpy; every random draw comes from an explicit `np.random.Generator`. `simulate_clients` runs
the whole pipeline the way the reference does: partition → noise (on every client's data) → missing
classes masked per client, with independent streams derived from one seed.

The noise depends on the labels' kind (`NOISE_TYPES`): multi-label data get the instance-dependent
multi-label noise of ALGORITHMS.md §1 (`noise.py`, noise type "multilabel_instance"); single-label
(one-hot) data get symmetric, pair or instance-dependent flips with per-client rates
(`singlelabel_noise.py`), and every single-label client annotates every class.
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
from fednml_jax.corruption.singlelabel_noise import (SINGLE_LABEL_NOISE_TYPES, client_noise_rates,
                                                     corrupt_single_labels, one_hot_classes)
from fednml_jax.errors import ConfigError

__all__ = [
    "CorruptedData", "simulate_clients", "iid_partition", "dirichlet_partition", "primary_classes",
    "corrupt_labels", "label_prior", "soft_labels", "true_label_probability", "flip_probabilities",
    "flip_distribution", "draw_annotated_classes", "mask_missing_classes", "PARTITIONS",
    "stream", "STREAM_PARTITION", "STREAM_NOISE", "STREAM_MISSING", "STREAM_CLIENT_RATES",
    "NOISE_TYPES", "MULTILABEL_NOISE", "SINGLE_LABEL_NOISE_TYPES", "client_noise_rates",
    "corrupt_single_labels", "one_hot_classes",
]

PARTITIONS = ("iid", "dirichlet")
# Stream ids: the generator for a stage is `default_rng(SeedSequence([seed, STREAM_...]))`.
STREAM_PARTITION = 0
STREAM_NOISE = 1
STREAM_MISSING = 2
STREAM_CLIENT_RATES = 3  # which clients are noisy, and how much (heterogeneous single-label rates)

MULTILABEL_NOISE = "multilabel_instance"
# The noise types of each task (`config.task`); the first is the task's default.
NOISE_TYPES = {"multilabel": (MULTILABEL_NOISE,), "singlelabel": SINGLE_LABEL_NOISE_TYPES}


@dataclasses.dataclass(frozen=True)
class CorruptedData:
  """The simulated federation over one training split (arrays are read-only).

  client_indices: per client, sorted int64 indices into the training split; disjoint. Samples in no
    client (the IID remainder) keep their labels but are never trained on.
  clean_labels: (N, C) the original labels.
  noisy_labels: (N, C) after the noise, before masking (same dtype as the input).
  observed_labels: (N, C) after noise and masking: what the clients train on.
  corrupted: bool (N,), the samples drawn for corruption (ground truth for diagnostics); for
    single-label noise, the samples whose class changed.
  annotated: bool (K, C), the classes each client annotates (all of them for single-label data).
  client_noise_rates: (K,) each client's noise rate (the same for all but in the heterogeneous
    single-label setting).
  """
  client_indices: list[np.ndarray]
  clean_labels: np.ndarray
  noisy_labels: np.ndarray
  observed_labels: np.ndarray
  corrupted: np.ndarray
  annotated: np.ndarray
  client_noise_rates: np.ndarray

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
                     seed: int = 0, noise_type: str = MULTILABEL_NOISE,
                     noisy_client_fraction: float | None = None, min_client_noise: float = 0.5,
                     train_images: np.ndarray | None = None) -> CorruptedData:
  """Partition → label noise → missing classes, as ALGORITHMS.md §1 specifies.

  `partition` is "iid" (equal sizes, remainder dropped) or "dirichlet" (label skew with
  `dirichlet_alpha`, every client at least `DEFAULT_MIN_SIZE` samples). The stages draw from
  `stream(seed, STREAM_PARTITION / STREAM_NOISE / STREAM_MISSING)`, so e.g. changing `noise_rate`
  changes neither the partition nor the annotated classes.

  `noise_type` picks the path. "multilabel_instance" (the default): multi-hot labels, the
  instance-dependent noise of `noise.py` at `noise_rate` on every client, then `annotation_num`
  classes kept per client. "symmetric", "pair" or "instance": one-hot labels, every client
  annotates all classes (`annotation_num` must be C), client rates from `client_noise_rates`
  (`noise_rate` for all, or FedCorr's heterogeneous draw with `noisy_client_fraction` and
  `min_client_noise`, from `stream(seed, STREAM_CLIENT_RATES)`), noise from
  `corrupt_single_labels` ("instance" needs `train_images`).
  """
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
  if partition not in PARTITIONS:
    raise ConfigError(f"partition must be one of {PARTITIONS}, got {partition!r}.")
  if noise_type not in (MULTILABEL_NOISE, *SINGLE_LABEL_NOISE_TYPES):
    raise ConfigError(f"noise_type must be one of {(MULTILABEL_NOISE, *SINGLE_LABEL_NOISE_TYPES)}, "
                      f"got {noise_type!r}.")
  single_label = noise_type in SINGLE_LABEL_NOISE_TYPES
  clean = np.asarray(train_labels).copy()
  if single_label:
    one_hot_classes(clean)
  n, num_classes = _as_binary_labels(clean).shape
  if single_label and annotation_num != num_classes:
    raise ConfigError(f"annotation_num = {annotation_num!r}, but single-label clients annotate "
                      f"every class: it must be the number of classes, {num_classes} (or None in "
                      "the config).")
  if not single_label and noisy_client_fraction is not None:
    raise ConfigError("noisy_client_fraction (heterogeneous client noise rates) applies to the "
                      "single-label noise types only; the multi-label noise uses noise_rate on "
                      "every client.")
  _check_noise_rate(noise_rate)  # fail on config before any work
  annotated = draw_annotated_classes(num_classes, num_clients, annotation_num,
                                     stream(seed, STREAM_MISSING))
  if single_label:
    rates = client_noise_rates(num_clients, noise_rate, noisy_client_fraction, min_client_noise,
                               stream(seed, STREAM_CLIENT_RATES))
  else:
    rates = np.full(num_clients, float(noise_rate))
  if partition == "iid":
    clients = iid_partition(n, num_clients, stream(seed, STREAM_PARTITION))
  else:
    clients = dirichlet_partition(clean, num_clients, dirichlet_alpha,
                                  stream(seed, STREAM_PARTITION), min_size=DEFAULT_MIN_SIZE)
  if single_label:
    noisy, corrupted = corrupt_single_labels(clean, clients, rates, noise_type,
                                             stream(seed, STREAM_NOISE), images=train_images)
  else:
    noisy, corrupted = corrupt_labels(clean, clients, noise_rate, stream(seed, STREAM_NOISE))
  observed = mask_missing_classes(noisy, clients, annotated)
  for array in (*clients, clean, noisy, observed, corrupted, annotated, rates):
    array.flags.writeable = False
  return CorruptedData(client_indices=clients, clean_labels=clean, noisy_labels=noisy,
                       observed_labels=observed, corrupted=corrupted, annotated=annotated,
                       client_noise_rates=rates)
