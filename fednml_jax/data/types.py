"""The form every data source returns.

Images are uint8, channel-last `(N, H, W, C)` with `C` in {1, 3}; labels are multi-hot uint8
`(N, num_classes)` with values in {0, 1}. Sources differ only in where the pixels come from: an
in-memory array, or `RowReader` for sources with random access to their images on disk (only the
rows asked for are read, so each process of a multi-host run reads only its clients' images).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fednml_jax.errors import DataError


class RowReader:
  """Images read from disk on demand: an array-like of shape (N, H, W, C) whose indexing reads
  only the rows it selects.

  `read(rows)` returns the images at the source's sorted, unique positions `rows` (int64, 1-D).
  `reader[index]` (an int, a slice, an integer array of any shape or a boolean mask) returns a
  numpy array; `np.asarray(reader)` reads every row; `reader.subset(index)` is a reader of those
  rows that reads nothing yet. `rows_read` counts the images read so far (shared by subsets).
  """

  def __init__(self, read, image_shape: tuple[int, ...], rows: np.ndarray, counter=None):
    self._read = read
    self._rows = np.asarray(rows, dtype=np.int64)
    self._counter = counter if counter is not None else [0]
    self.shape = (len(self._rows),) + tuple(image_shape)
    self.dtype = np.dtype(np.uint8)
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  @property
  def rows_read(self) -> int:
    return self._counter[0]

  def _positions(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self._rows[[index]]
    return self._rows[index]

  def subset(self, index) -> "RowReader":
    return RowReader(self._read, self.shape[1:], self._positions(index).ravel(), self._counter)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):
      raise TypeError("RowReader is indexed along its first axis only.")
    positions = self._positions(index)
    unique, inverse = np.unique(positions, return_inverse=True)
    images = self._read(unique) if unique.size else np.zeros((0,) + self.shape[1:], self.dtype)
    self._counter[0] += unique.size
    out = images[inverse.reshape(positions.shape)]
    return out[0] if isinstance(index, (int, np.integer)) else out

  def __array__(self, dtype=None, copy=None):
    images = self[:]
    return images if dtype is None else images.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset: images, multi-hot labels and optional per-image ids."""

  images: np.ndarray | RowReader  # uint8 (N, H, W, C)
  labels: np.ndarray  # uint8 (N, num_classes), values in {0, 1}
  ids: np.ndarray | None = None  # (N,) image ids (str or int) for traceability

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, index: np.ndarray) -> "Split":
    """The rows `index` (a boolean mask or integer indices) of this split (read nothing)."""
    images = self.images.subset(index) if isinstance(self.images, RowReader) else \
        self.images[index]
    return Split(images, self.labels[index],
                 None if self.ids is None else self.ids[index])

  def with_classes(self, keep: np.ndarray) -> "Split":
    """This split restricted to the label columns `keep`."""
    return Split(self.images, self.labels[:, keep], self.ids)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image dataset with train, validation and test splits."""

  name: str
  train: Split
  val: Split
  test: Split
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

  def splits(self) -> dict[str, Split]:
    return {"train": self.train, "val": self.val, "test": self.test}


def as_image_array(images: np.ndarray, where: str) -> np.ndarray:
  """Checks and normalises images to uint8 (N, H, W, C) with C in {1, 3}."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(
        f"{where}: images must be grey (N, H, W) or colour (N, H, W, 3) arrays, got shape "
        f"{images.shape}.")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.number) or images.min() < 0 or images.max() > 255:
      raise DataError(f"{where}: images must be uint8 pixels in 0..255, got dtype {images.dtype}.")
    images = images.astype(np.uint8)
  return images


def as_label_array(labels: np.ndarray, num_images: int, where: str) -> np.ndarray:
  """Checks that labels are a (N, C) array of 0/1 values and returns them as uint8."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    labels = labels[:, None]
  if labels.ndim != 2:
    raise DataError(f"{where}: labels must be a (N, num_classes) multi-hot array, got shape "
                    f"{labels.shape}.")
  if labels.shape[0] != num_images:
    raise DataError(f"{where}: {labels.shape[0]} label rows for {num_images} images; the two must "
                    "have the same length.")
  if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
    bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5] if np.issubdtype(
        labels.dtype, np.number) else labels.dtype
    raise DataError(f"{where}: labels must be 0 or 1, found {bad}. Multi-label datasets need one "
                    "0/1 column per class.")
  return labels.astype(np.uint8)


_MOMENTS_CHUNK = 512  # images read at a time (bounds memory on large images)


def channel_sums(images) -> tuple[np.ndarray, np.ndarray, int]:
  """Per-channel sums of the pixels / 255 of uint8 `images` (N, H, W, C) and of their squares, in
  float64, and the pixel count per channel, accumulated over chunks of images (no float copy of
  the whole set)."""
  total = np.zeros(images.shape[-1])
  squares = np.zeros(images.shape[-1])
  for start in range(0, len(images), _MOMENTS_CHUNK):
    x = images[start:start + _MOMENTS_CHUNK].reshape(-1, images.shape[-1]) / 255.0
    total += x.sum(axis=0)
    squares += np.square(x).sum(axis=0)
  return total, squares, int(np.prod(images.shape[:-1]))


def moments_from_sums(total, squares, count) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation (floored at 1e-3) from `channel_sums`' output."""
  mean = total / count
  return mean, np.maximum(np.sqrt(np.maximum(squares / count - mean**2, 0.0)), 1e-3)


def channel_moments(images) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation (floored at 1e-3) of uint8 `images` (N, H, W, C) /
  255, in float64."""
  return moments_from_sums(*channel_sums(images))
