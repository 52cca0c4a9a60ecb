"""The embedded datasets: scikit-learn's handwritten digits as multi-label mosaics or single digits.

Real pixels that ship with a dependency, so the demo and the tests need no download. Each image is a
2×2 grid of 8×8 digit tiles (scikit-learn's `load_digits`, 1,797 scans of 43 writers' digits)
upscaled to 32×32 grey; one to three cells hold a digit, the others stay blank, and the label is the
set of digits that appear (10 classes). Digit classes are drawn with an uneven (Zipf-like) frequency,
so, as in medical data, some classes are common and others rare. Train, validation and test mosaics
are built from disjoint pools of source scans. The dataset is a fixed function of its sizes: it does
not depend on the run seed.

The single-label form (`data.source = "embedded_digits"`, for `task = "singlelabel"`; see
`load_single_digits`) draws on the same source pools: each 32×32 image holds one digit scan upscaled
to 24×24 at a random position, classes are balanced, and the label is one-hot over the 10 digits.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fednml_jax.data.types import Dataset, Split

_DATA_SEED = 20261122
CLASS_NAMES = tuple(f"digit_{d}" for d in range(10))


def class_frequencies(num_classes: int = 10, exponent: float = 1.0) -> np.ndarray:
  """Zipf-like class probabilities, most frequent first: p_c ∝ 1 / (c + 1)^exponent."""
  p = 1.0 / np.arange(1, num_classes + 1) ** exponent
  return p / p.sum()


def _mosaics(tiles_by_class, count, rng, scale):
  freq = class_frequencies()
  images = np.zeros((count, 16 * scale, 16 * scale, 1), np.uint8)
  labels = np.zeros((count, 10), np.uint8)
  for i in range(count):
    num_digits = rng.integers(1, 4)
    cells = rng.choice(4, size=num_digits, replace=False)
    classes = rng.choice(10, size=num_digits, p=freq)  # repeats allowed: "which digits appear"
    for cell, digit in zip(cells, classes):
      pool = tiles_by_class[digit]
      tile = pool[rng.integers(len(pool))]
      r, c = divmod(int(cell), 2)
      big = np.kron(tile, np.ones((scale, scale), np.uint8))
      images[i, r * 8 * scale:(r + 1) * 8 * scale, c * 8 * scale:(c + 1) * 8 * scale, 0] = big
      labels[i, digit] = 1
  return images, labels


def _single_digits(tiles_by_class, count, rng, scale):
  images = np.zeros((count, 32, 32, 1), np.uint8)
  size = 8 * scale
  labels = rng.permutation(np.arange(count) % 10)  # balanced classes
  for i, digit in enumerate(labels):
    pool = tiles_by_class[digit]
    tile = np.kron(pool[rng.integers(len(pool))], np.ones((scale, scale), np.uint8))
    r, c = rng.integers(0, 32 - size + 1, size=2)
    images[i, r:r + size, c:c + size, 0] = tile
  return images, np.eye(10, dtype=np.uint8)[labels]


def _digit_splits(sizes: dict, make_images, name: str) -> Dataset:
  """Splits built by `make_images(tiles_by_class, count, rng)` from disjoint pools of scans: 60% of
  the 1,797 scans for train, 15% validation, 25% test (a fixed permutation)."""
  digits = load_digits()
  tiles = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # (1797, 8, 8)
  rng = np.random.default_rng(_DATA_SEED)
  order = rng.permutation(len(tiles))
  cut1, cut2 = int(0.6 * len(order)), int(0.75 * len(order))
  pools = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
  splits = {}
  for split, pool in pools.items():
    by_class = [tiles[pool[digits.target[pool] == d]] for d in range(10)]
    images, labels = make_images(by_class, sizes[split], rng)
    splits[split] = Split(images, labels, np.array([f"{split}_{i}" for i in range(sizes[split])]))
  return Dataset(name, splits["train"], splits["val"], splits["test"], CLASS_NAMES)


def load_digit_mosaics(num_train: int = 1200, num_val: int = 300, num_test: int = 600,
                       scale: int = 2) -> Dataset:
  """Builds the embedded multi-label digit-mosaic dataset (deterministic)."""
  sizes = {"train": num_train, "val": num_val, "test": num_test}
  return _digit_splits(sizes, lambda tiles, count, rng: _mosaics(tiles, count, rng, scale),
                       "digit_mosaics")


def load_single_digits(num_train: int = 1200, num_val: int = 300, num_test: int = 600,
                       scale: int = 3) -> Dataset:
  """Builds the embedded single-label digit dataset (deterministic): one digit per 32×32 image,
  balanced classes, one-hot labels."""
  sizes = {"train": num_train, "val": num_val, "test": num_test}
  return _digit_splits(sizes, lambda tiles, count, rng: _single_digits(tiles, count, rng, scale),
                       "single_digits")
