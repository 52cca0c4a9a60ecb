"""Embedded and npz data sources, the rare-class filter."""

import numpy as np
import pytest

from fednml_jax import train
from fednml_jax.data import drop_rare_classes, load_dataset
from fednml_jax.data.embedded import load_digit_mosaics
from fednml_jax.data.npz import load_npz
from fednml_jax.data.types import RowReader
from fednml_jax.errors import DataError

from conftest import shared_file, tiny_config


def test_embedded_mosaics_are_deterministic_uneven_and_real():
  a = load_digit_mosaics(100, 30, 40)
  b = load_digit_mosaics(100, 30, 40)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert a.train.images.shape == (100, 32, 32, 1) and a.train.images.dtype == np.uint8
  assert a.num_classes == 10
  counts = load_digit_mosaics(1200, 30, 40).train.labels.sum(0)
  assert counts[0] > 3 * counts[9]  # uneven (Zipf-like) class frequencies
  assert (a.train.labels.sum(1) >= 1).all() and (a.train.labels.sum(1) <= 3).all()


def test_drop_rare_classes_keeps_classes_with_enough_training_positives():
  ds = load_digit_mosaics(200, 30, 40)
  counts = ds.train.labels.sum(0)
  kept = drop_rare_classes(ds, int(np.sort(counts)[3]))
  assert kept.num_classes == int((counts >= np.sort(counts)[3]).sum())
  assert kept.test.labels.shape[1] == kept.num_classes
  with pytest.raises(DataError, match="min_positives"):
    drop_rare_classes(ds, 10_000)


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_npz_grey_images_and_carved_validation(tmp_path):
  rng = np.random.default_rng(0)
  path = _write_npz(tmp_path / "x.npz", train_images=rng.integers(0, 255, (20, 8, 8), np.uint8),
                    train_labels=rng.integers(0, 2, (20, 3)),
                    test_images=rng.integers(0, 255, (5, 8, 8), np.uint8),
                    test_labels=rng.integers(0, 2, (5, 3)))
  ds = load_npz(path, val_fraction=0.2)
  assert ds.train.images.shape == (16, 8, 8, 1) and len(ds.val) == 4 and len(ds.test) == 5
  assert ds.class_names == ("class_0", "class_1", "class_2")


def _write_stored_and_packed(folder, image_shape, num_classes, sizes, seed):
  """The same random train/val/test arrays written uncompressed (np.savez) and compressed; their
  paths, in that order."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in zip(("train", "val", "test"), sizes):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n,) + tuple(image_shape), np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, 2, (n, num_classes))
  np.savez(folder / "stored.npz", **arrays)
  np.savez_compressed(folder / "packed.npz", **arrays)
  return str(folder / "stored.npz"), str(folder / "packed.npz")


@pytest.mark.parametrize("channels", [None, 3])
def test_uncompressed_npz_images_are_read_on_demand(tmp_path, channels):
  shape = (8, 8) if channels is None else (8, 8, channels)
  paths = _write_stored_and_packed(tmp_path, shape, 3, (30, 6, 5), seed=1)
  stored, packed = (load_npz(path) for path in paths)
  assert isinstance(stored.train.images, RowReader) and isinstance(packed.train.images, np.ndarray)
  for name in ("train", "val", "test"):
    a, b = getattr(stored, name), getattr(packed, name)
    assert a.images.shape == b.images.shape == (len(b),) + (8, 8, channels or 1)
    np.testing.assert_array_equal(np.asarray(a.images), b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  images = load_npz(paths[0]).train.images
  np.testing.assert_array_equal(images[np.array([7, 2, 7])], packed.train.images[[7, 2, 7]])
  assert images.rows_read == 2  # rows 2 and 7, once each


def test_per_client_layout_on_an_uncompressed_npz_matches_the_compressed_file(tmp_path):
  # Per-client image layout on a stored .npz: the images placed and the statistics are those of
  # the compressed file (read whole), and each training image is read once. (That a process reads
  # only its own clients' rows is tested across two processes, on a CSV source whose images are
  # also a RowReader, in test_distributed.py.)
  paths = _write_stored_and_packed(tmp_path, (16, 16, 3), 4, (40, 8, 8), seed=2)
  experiments = [train.Experiment(tiny_config(**{
      "data.source": "npz", "data.path": path, "data.min_positives": 0,
      "labels.annotation_num": 3, "fl.image_layout": "per_client"}))
      for path in paths]
  stored, packed = experiments
  np.testing.assert_array_equal(np.asarray(stored.train_images), np.asarray(packed.train_images))
  np.testing.assert_array_equal(stored.image_mean, packed.image_mean)
  np.testing.assert_array_equal(stored.image_std, packed.image_std)
  assert stored.dataset.train.images.rows_read == len(stored.dataset.train)


@pytest.mark.parametrize("arrays, phrase", [
    (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 2))),
     "test_images"),
    (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((3, 2)),
          test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.zeros((2, 2))),
     "same length"),
    (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.full((4, 2), 2),
          test_images=np.zeros((2, 8, 8), np.uint8), test_labels=np.zeros((2, 2))),
     "must be 0 or 1"),
    (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 2)),
          test_images=np.zeros((0, 8, 8), np.uint8), test_labels=np.zeros((0, 2))),
     "empty"),
])
def test_npz_errors(tmp_path, arrays, phrase):
  with pytest.raises(DataError, match=phrase):
    load_npz(_write_npz(tmp_path / "bad.npz", **arrays))


def test_npz_missing_or_garbage_file(tmp_path):
  with pytest.raises(DataError, match="No .npz file"):
    load_npz(str(tmp_path / "nope.npz"))
  (tmp_path / "junk.npz").write_text("not a zip")
  with pytest.raises(DataError, match="not a readable"):
    load_npz(str(tmp_path / "junk.npz"))


def test_shared_rfmid_file_loads_with_nine_classes():
  path = shared_file("rfmid_dev_64px.npz")
  ds = load_dataset(tiny_config(**{"data.source": "npz", "data.path": str(path),
                                   "data.min_positives": 20}).data)
  assert ds.num_classes == 9
  assert ds.class_names == ("DR", "ARMD", "MH", "DN", "MYA", "TSLN", "LS", "ODC", "ODP")
  assert ds.train.images.shape == (949, 64, 64, 3)
  np.testing.assert_array_equal(ds.train.labels.sum(0), [376, 40, 317, 33, 33, 186, 42, 282, 26])


def test_shared_nih_file_loads_grey_with_ten_classes():
  path = shared_file("nih_cxr14_1000_64px.npz")
  ds = load_dataset(tiny_config(**{"data.source": "npz", "data.path": str(path),
                                   "data.min_positives": 20}).data)
  assert ds.num_classes == 10 and ds.train.images.shape == (596, 64, 64, 1)
