"""Deterministic carving of held-out splits from a dataset that ships without them.

Some published datasets have no validation split (MuReD) or no split at all (BRSET). The splits
carved here depend only on the image ids and a fixed seed, never on the run seed or on the row order
of a CSV file, so every run, method and client sees the same train/val/test partition.
"""

from __future__ import annotations

import math

import numpy as np

from fednml_jax.errors import ConfigError, DataError
from fednml_jax.data.types import Split


def _id_order(split: Split) -> np.ndarray:
  """Row indices of `split` sorted by image id (row order when the split has no ids)."""
  n = len(split)
  if split.ids is None:
    return np.arange(n)
  keys = np.asarray([str(i) for i in split.ids])
  return np.argsort(keys, kind="stable")


def split_off(split: Split, fraction: float, seed: int, what: str = "validation"
              ) -> tuple[Split, Split]:
  """Splits `split` into `(rest, part)` with `part` holding `fraction` of the rows.

  Rows are put in id order, permuted with `np.random.default_rng(seed)` and the first
  `round(fraction * N)` (at least 1, at most N - 1) go to `part`. Both outputs keep the rows in
  their original relative order. `what` names the carved split in error messages.
  """
  if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
    raise ConfigError(f"The {what} fraction must be a number strictly between 0 and 1, got "
                      f"{fraction!r}.")
  n = len(split)
  if n < 2:
    raise DataError(f"Cannot carve a {what} split out of a split with {n} image(s): at least 2 "
                    "are needed so that both parts are non-empty. Check that the dataset's CSV "
                    "files list all of its images.")
  count = min(max(int(math.floor(float(fraction) * n + 0.5)), 1), n - 1)
  order = _id_order(split)
  permuted = order[np.random.default_rng(seed).permutation(n)]
  mask = np.zeros(n, dtype=bool)
  mask[permuted[:count]] = True
  return split.take(~mask), split.take(mask)


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  """Carves a validation split off `train`; returns `(train_rest, val)`.

  Deterministic: the result depends only on the ids in `train` (or its row order when it has no
  ids), `fraction` and `seed`. `val` gets `round(fraction * len(train))` rows, at least one.
  """
  return split_off(train, fraction, seed, what="validation")
