"""Label noise for single-label (one-hot) data: symmetric, pair and instance-dependent flips.

The noise of the seed papers' single-label experiments (FedCorr, FedNoRo, MaskedOptim, FedELC on
CIFAR-10 and similar). Labels are one-hot (N, C) rows; each client k has its own noise rate `r_k`
(`client_noise_rates`), and the noise of one type is applied client by client:

* `symmetric`: exactly `int(r_k·n_k)` of client k's samples, drawn uniformly without replacement,
  get a uniformly random *other* class (MaskedOptim's `noisify_label(..., "symmetric")`; FedCorr
  draws each sample with probability `r_k` and a class among all C, the true one included, so its
  realised rate is about `r_k·(C−1)/C`; we keep this project's exact-count convention of
  ALGORITHMS.md §1 and always change the class).
* `pair`: the same exact count of samples, class c → (c + 1) mod C (the "pair-flip" / asymmetric
  noise of Han et al., Co-teaching, NeurIPS 2018; MaskedOptim flips to c − 1, the same noise up to
  renaming the classes).
* `instance`: the instance-dependent generation of Xia et al., "Part-dependent Label Noise: Towards
  Instance-dependent Label Noise", NeurIPS 2020 (their `get_instance_noisy_label`, which later
  papers reuse as "instance-dependent noise"):
  1. per sample a flip rate `q_i ~ N(r_k, 0.1²)` truncated to [0, 1] (`truncated_normal`);
  2. one projection `W_c ~ N(0, 1)^(d × C)` per true class c, shared by all clients, with d the
     number of pixel values of an image (`projections`);
  3. `z = x_i · W_{y_i}` on the image's features x_i (pixels / 255, standardised with the whole
     training split's per-channel mean and standard deviation, as the model's input, then
     flattened; `image_features`); `z[y_i] = −∞`;
  4. the sample's label distribution is `q_i·softmax(z)` on the other classes and `1 − q_i` on
     `y_i` (`instance_flip_distribution`), and its new label is drawn from it.
  The expected share of flipped labels is the mean of `q_i`, which is `r_k` up to the truncation
  (negligible for 0.1 ≤ r_k ≤ 0.9). The count is random, not exact, and a client with `r_k = 0` is
  left clean (the truncated normal around 0 would still flip about 8% of its labels).

Per-client rates (`client_noise_rates`): either the same `noise_rate` for every client, or FedCorr's
heterogeneous setting (Xu et al., CVPR 2022, `util/util.py::add_noise`): each client is noisy with
probability ρ (`noisy_client_fraction`, FedCorr's `level_n_system`), and a noisy client's rate is
drawn from U(τ, 1) (`min_client_noise`, FedCorr's `level_n_lowerb`); the other clients stay clean.

Randomness, as the multi-label noise (`noise.py`): `corrupt_single_labels` spawns children of the
generator it is given; child 0 draws the projections of `instance` noise and child k + 1 draws
client k's samples and classes, so a client's draws depend only on the seed and on k.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from fednml_jax.corruption.noise import _check_noise_rate, _spawn
from fednml_jax.corruption.partition import _check_client_indices
from fednml_jax.data.types import channel_moments
from fednml_jax.errors import ConfigError, DataError

SINGLE_LABEL_NOISE_TYPES = ("symmetric", "pair", "instance")
INSTANCE_RATE_STD = 0.1  # Xia et al.'s `norm_std`
_FEATURE_CHUNK = 512  # images turned into features at a time (bounds memory on large images)


def one_hot_classes(labels: np.ndarray, where: str = "Training labels") -> np.ndarray:
  """The class index (N,) of each one-hot row of `labels` (N, C); `DataError` if a row does not
  have exactly one positive."""
  array = np.asarray(labels)
  if array.ndim != 2:
    raise DataError(f"{where} must be an (N, C) one-hot matrix, got shape {array.shape}.")
  if array.size and not np.isin(array, (0, 1)).all():
    raise DataError(f"{where} must contain only 0 and 1 (one-hot), but other values were found.")
  positives = array.astype(bool).sum(axis=1)
  if not np.all(positives == 1):
    bad = int(np.flatnonzero(positives != 1)[0])
    raise DataError(
        f"{where}: config.task = 'singlelabel' needs exactly one positive class per image, but "
        f"row {bad} has {int(positives[bad])} (and {int((positives != 1).sum())} rows in all). "
        "Use a single-label source (e.g. data.source = 'embedded_digits'; 'embedded' is the "
        "multi-label mosaics), or check that data.min_positives did not drop some images' class.")
  return np.argmax(array, axis=1).astype(np.int64)


def client_noise_rates(num_clients: int, noise_rate: float, noisy_client_fraction: float | None,
                       min_client_noise: float, rng: np.random.Generator) -> np.ndarray:
  """Each client's noise rate (K,): `noise_rate` for all, or FedCorr's heterogeneous draw.

  With `noisy_client_fraction = ρ` (not None): client k is noisy with probability ρ (one uniform
  per client, `u_k < ρ`), and then its rate is `τ + (1 − τ)·v_k` with `v_k ~ U[0, 1)` and
  `τ = min_client_noise`; otherwise its rate is 0. `noise_rate` must then be 0 (it is not used).
  """
  noise_rate = _check_noise_rate(noise_rate)
  if noisy_client_fraction is None:
    return np.full(num_clients, noise_rate)
  fraction = noisy_client_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
      or not 0.0 <= fraction <= 1.0:
    raise ConfigError(f"noisy_client_fraction must be a number in [0, 1] (the probability that a "
                      f"client is noisy), got {noisy_client_fraction!r}.")
  if isinstance(min_client_noise, bool) or not isinstance(min_client_noise, numbers.Real) \
      or not 0.0 <= min_client_noise < 1.0:
    raise ConfigError(f"min_client_noise must be a number in [0, 1) (the lower end of a noisy "
                      f"client's rate, drawn from U(min_client_noise, 1)), got "
                      f"{min_client_noise!r}.")
  if noise_rate != 0.0:
    raise ConfigError(f"noise_rate = {noise_rate} and noisy_client_fraction = {fraction} are two "
                      "ways of setting the client noise rates; set noise_rate = 0 to draw "
                      "heterogeneous rates, or noisy_client_fraction = None for one fixed rate.")
  noisy = rng.random(num_clients) < fraction
  level = min_client_noise + (1.0 - min_client_noise) * rng.random(num_clients)
  return np.where(noisy, level, 0.0)


def symmetric_flip(classes: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
  """Each class replaced by a uniformly random other class (needs `num_classes` ≥ 2)."""
  offsets = rng.integers(1, num_classes, size=np.shape(classes))
  return (np.asarray(classes) + offsets) % num_classes


def pair_flip(classes: np.ndarray, num_classes: int) -> np.ndarray:
  """Class c → (c + 1) mod C."""
  return (np.asarray(classes) + 1) % num_classes


def truncated_normal(mean: float, std: float, size: int, rng: np.random.Generator,
                     low: float = 0.0, high: float = 1.0) -> np.ndarray:
  """`size` draws of N(mean, std²) conditioned on [low, high] (rejection: out-of-range draws are
  redrawn, which samples exactly the truncated distribution)."""
  out = rng.normal(mean, std, size)
  bad = (out < low) | (out > high)
  while bad.any():
    out[bad] = rng.normal(mean, std, int(bad.sum()))
    bad = (out < low) | (out > high)
  return out


def image_features(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Flattened float32 features (n, H·W·C): pixels / 255 standardised per channel."""
  x = (np.asarray(images, np.float32) / 255.0 - mean.astype(np.float32)) / std.astype(np.float32)
  return x.reshape(len(x), -1)


def instance_flip_distribution(logits: np.ndarray, classes: np.ndarray,
                               flip_rates: np.ndarray) -> np.ndarray:
  """Xia et al.'s per-sample label distribution (n, C): `q·softmax(z)` over the classes other than
  the true one (the true class's logit is excluded) and `1 − q` on the true class.

  logits (n, C) the projections `x·W_y`; classes (n,) the true classes; flip_rates (n,) the `q`s.
  """
  z = np.asarray(logits, np.float64).copy()
  rows = np.arange(len(z))
  z[rows, classes] = -np.inf
  z = np.exp(z - z.max(axis=1, keepdims=True))
  dist = np.asarray(flip_rates, np.float64)[:, None] * z / z.sum(axis=1, keepdims=True)
  dist[rows, classes] = 1.0 - np.asarray(flip_rates, np.float64)
  return dist


def projections(images: np.ndarray, classes: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> np.ndarray:
  """`x_i · W_{y_i}` (n, C) for images (n, H, W, C) and their true classes (n,), with `x_i` the
  image's features (`image_features` with the moments of `images`).

  `W_c` (d, C) is drawn for c = 0, 1, ..., C − 1 in turn from `rng` (the same numbers as one
  (C, d, C) block of standard normals), whichever classes occur.
  """
  images = np.asarray(images)
  mean, std = channel_moments(images)
  features_per_image = int(np.prod(images.shape[1:]))
  logits = np.zeros((len(classes), num_classes))
  for c in range(num_classes):
    weights = rng.standard_normal((features_per_image, num_classes)).astype(np.float32)
    rows = np.flatnonzero(classes == c)
    for start in range(0, rows.size, _FEATURE_CHUNK):
      chunk = rows[start:start + _FEATURE_CHUNK]
      logits[chunk] = image_features(images[chunk], mean, std) @ weights
  return logits


def corrupt_single_labels(labels: np.ndarray, client_indices: Sequence[np.ndarray],
                          client_rates: np.ndarray, noise_type: str, rng: np.random.Generator,
                          images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Single-label noise per client (see the module docstring).

  Args:
    labels: (N, C) one-hot labels of the whole training split.
    client_indices: one int array of indices into `labels` per client; disjoint.
    client_rates: (K,) each client's noise rate in [0, 1) (`client_noise_rates`).
    noise_type: "symmetric", "pair" or "instance".
    rng: parent generator; children are spawned from it (module docstring).
    images: (N, H, W, C) training images, needed by "instance" only.

  Returns:
    `(noisy_labels, corrupted)`: one-hot noisy labels with the dtype of `labels` (samples outside
    every client unchanged) and the bool (N,) mask of the samples whose class changed.
  """
  if noise_type not in SINGLE_LABEL_NOISE_TYPES:
    raise ConfigError(f"noise_type must be one of {SINGLE_LABEL_NOISE_TYPES} for single-label "
                      f"data, got {noise_type!r}.")
  original = np.asarray(labels)
  classes = one_hot_classes(original)
  n, num_classes = original.shape
  client_indices = _check_client_indices(client_indices, n)
  client_rates = np.asarray(client_rates, np.float64)
  if client_rates.shape != (len(client_indices),):
    raise ValueError(f"client_rates has shape {client_rates.shape}, expected "
                     f"({len(client_indices)},) = one rate per client")
  for rate in client_rates:
    _check_noise_rate(float(rate))
  noisy_classes = classes.copy()
  if np.any(client_rates > 0) and num_classes < 2:
    raise DataError("Single-label noise needs at least 2 classes to flip between; the data has 1.")
  children = _spawn(rng, len(client_indices) + 1)

  if noise_type == "instance" and np.any(client_rates > 0):
    if images is None or len(images) != n:
      raise ValueError("instance noise needs the (N, H, W, C) training images of the labels")
    logits = projections(images, classes, num_classes, children[0])

  for idx, rate, client_rng in zip(client_indices, client_rates, children[1:]):
    if rate == 0 or idx.size == 0:
      continue
    if noise_type == "instance":
      flip_rates = truncated_normal(rate, INSTANCE_RATE_STD, idx.size, client_rng)
      dist = instance_flip_distribution(logits[idx], classes[idx], flip_rates)
      cumulative = np.cumsum(dist, axis=1)
      draws = client_rng.random(idx.size)
      noisy_classes[idx] = np.minimum((cumulative <= draws[:, None]).sum(axis=1), num_classes - 1)
      continue
    count = int(rate * idx.size)
    chosen = idx[np.sort(client_rng.choice(idx.size, size=count, replace=False))]
    if noise_type == "symmetric":
      noisy_classes[chosen] = symmetric_flip(classes[chosen], num_classes, client_rng)
    else:
      noisy_classes[chosen] = pair_flip(classes[chosen], num_classes)

  noisy = np.zeros_like(original)
  noisy[np.arange(n), noisy_classes] = 1
  return noisy, noisy_classes != classes
