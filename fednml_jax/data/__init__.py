"""Data sources. Every source returns the same in-memory `Dataset` (see `types.py`).

`load_dataset(data_config)` dispatches on `data.source`:
- `embedded`: the built-in multi-label digit-mosaic dataset (no download; `embedded.py`);
- `embedded_digits`: the built-in single-label digits, one per image (for `task = "singlelabel"`);
- `npz`: a MedMNIST-layout `.npz` file at `data.path` (`npz.py`);
- `mured`, `rfmid`, `brset`: the published CSV + image-folder layouts under `data.path`, resized
  once to `data.image_size` and cached with a tensorflow-datasets builder (`csv_images.py`).
Then classes with fewer than `data.min_positives` training positives are dropped (the paper's rule).
"""

from __future__ import annotations

import numpy as np

from fednml_jax.data.types import Dataset, Split
from fednml_jax.errors import ConfigError, DataError

SOURCES = ("embedded", "embedded_digits", "npz", "mured", "rfmid", "brset")


def drop_rare_classes(dataset: Dataset, min_positives: int) -> Dataset:
  """Keeps the classes with at least `min_positives` positives in the training split."""
  positives = dataset.train.labels.sum(0)
  keep = np.flatnonzero(positives >= min_positives)
  if keep.size == 0:
    raise DataError(
        f"No class of {dataset.name} has {min_positives} training positives (the most is "
        f"{int(positives.max())}); lower --config.data.min_positives.")
  if keep.size == dataset.num_classes:
    return dataset
  names = tuple(dataset.class_names[c] for c in keep)
  return Dataset(dataset.name, dataset.train.with_classes(keep), dataset.val.with_classes(keep),
                 dataset.test.with_classes(keep), names)


def load_dataset(data_config) -> Dataset:
  source = data_config.source
  if source == "embedded":
    from fednml_jax.data.embedded import load_digit_mosaics
    dataset = load_digit_mosaics(data_config.embedded_train, data_config.embedded_val,
                                 data_config.embedded_test)
  elif source == "embedded_digits":
    from fednml_jax.data.embedded import load_single_digits
    dataset = load_single_digits(data_config.embedded_train, data_config.embedded_val,
                                 data_config.embedded_test)
  elif source == "npz":
    from fednml_jax.data.npz import load_npz
    dataset = load_npz(data_config.path, data_config.val_fraction)
  elif source in ("mured", "rfmid", "brset"):
    from fednml_jax.data.csv_images import load_csv_image_dataset
    dataset = load_csv_image_dataset(source, data_config.path, data_config.image_size,
                                     data_config.cache_dir or None)
  else:
    raise ConfigError(f"Unknown data source {source!r}; config.data.source must be one of "
                      f"{list(SOURCES)}.")
  return drop_rare_classes(dataset, data_config.min_positives)


__all__ = ["Dataset", "Split", "SOURCES", "drop_rare_classes", "load_dataset"]
