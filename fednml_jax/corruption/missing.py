"""Missing classes per client (ALGORITHMS.md §1 "Missing labels"; reference `DatasetSplit`).

Each client annotates only `annotation_num` of the `C` classes, drawn uniformly without replacement
and independently per client. On the other classes its positives read as negatives. The paper's
"Missing m" is `annotation_num = C − m`. As in the reference, masking is applied to the labels after
the noise (`DatasetSplit` zeroes the positives of the noisy `targets`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from fednml_jax.corruption.partition import _as_binary_labels, _check_client_indices
from fednml_jax.errors import ConfigError


def draw_annotated_classes(num_classes: int, num_clients: int, annotation_num: int,
                           rng: np.random.Generator) -> np.ndarray:
  """Bool (K, C) matrix; row k marks the `annotation_num` classes client k annotates.

  Row k is the first `annotation_num` classes of a uniform random permutation of the classes drawn
  from row k of one `(K, C)` block of uniforms, so a client's classes do not depend on the other
  rows, and with a fixed `rng` state a larger `annotation_num` gives a superset of classes.
  """
  for name, value in (("num_classes", num_classes), ("num_clients", num_clients)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
  if isinstance(annotation_num, bool) or not isinstance(annotation_num, numbers.Integral) \
      or not 1 <= annotation_num <= num_classes:
    raise ConfigError(
        f"annotation_num must be an integer from 1 to {num_classes} (the number of classes each "
        f"client annotates; 'Missing m' in the paper means annotation_num = {num_classes} - m), "
        f"got {annotation_num!r}.")
  order = np.argsort(rng.random((num_clients, num_classes)), axis=1)
  annotated = np.zeros((num_clients, num_classes), bool)
  np.put_along_axis(annotated, order[:, :annotation_num], True, axis=1)
  return annotated


def mask_missing_classes(labels: np.ndarray, client_indices: Sequence[np.ndarray],
                         annotated: np.ndarray) -> np.ndarray:
  """Zero each client's positives on the classes it does not annotate.

  labels (N, C) multi-hot (any numeric or bool dtype, kept); `client_indices[k]` indexes client k's
  samples; `annotated` is the bool (K, C) matrix of `draw_annotated_classes`. Returns a copy;
  samples outside every client are unchanged.
  """
  original = np.asarray(labels)
  n, num_classes = _as_binary_labels(original).shape
  client_indices = _check_client_indices(client_indices, n)
  annotated = np.asarray(annotated, bool)
  if annotated.shape != (len(client_indices), num_classes):
    raise ValueError(f"annotated has shape {annotated.shape}, expected "
                     f"({len(client_indices)}, {num_classes}) = (num_clients, num_classes)")
  masked = original.copy()
  for idx, keep in zip(client_indices, annotated):
    masked[np.ix_(idx, ~keep)] = 0
  return masked
