"""CSV + image-folder sources (MuReD, RFMiD, BRSET) and their tfds array_record cache.

Fixtures are tiny copies of each published layout written with Pillow: solid-colour images of
20x17 px (so a resized image must keep its colour exactly), a few classes, ids in the published
form.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fednml_jax.data import csv_images
from fednml_jax.data.csv_images import load_csv_image_dataset
from fednml_jax.data.splits import carve_validation, split_off
from fednml_jax.data.types import RowReader, Split
from fednml_jax.errors import ConfigError, DataError

SIZE = 8
BRSET_CLASSES = list(csv_images.LAYOUTS["brset"].class_columns)


def _colour(rng: np.random.Generator) -> np.ndarray:
  return rng.integers(0, 256, size=3, dtype=np.uint8)


def _write_image(path: Path, colour: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.broadcast_to(colour, (17, 20, 3)).copy()  # 20 wide, 17 high
  if path.suffix.lower() in (".jpg", ".jpeg"):
    Image.fromarray(pixels).save(path, quality=100)
  else:
    Image.fromarray(pixels).save(path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def _labels(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
  labels = rng.integers(0, 2, size=(n, c)).astype(np.uint8)
  labels[np.arange(n), rng.integers(0, c, size=n)] = 1  # every image has some label
  return labels


def make_mured(root: Path, seed: int = 0, id_column: str = "ID", n_train: int = 10,
               n_test: int = 4) -> dict:
  """MuReD: train_data.csv / test_data.csv + images/<id>.(png|tif), ids without extension."""
  rng = np.random.default_rng(seed)
  classes = ["DR", "NORMAL", "MH", "ODC"]
  truth = {}
  for split, csv_name, n, offset in (("train", "train_data.csv", n_train, 1),
                                     ("test", "test_data.csv", n_test, 100)):
    labels = _labels(rng, n, len(classes))
    ids = [str(offset + i) for i in range(n)]
    for i, image_id in enumerate(ids):
      colour = _colour(rng)
      _write_image(root / "images" / f"{image_id}{'.tif' if i % 3 == 0 else '.png'}", colour)
      truth[image_id] = (colour, labels[i])
    _write_csv(root / csv_name, [id_column, *classes],
               [[image_id, *map(int, labels[i])] for i, image_id in enumerate(ids)])
  return {"classes": classes, "truth": truth}


def make_rfmid(root: Path, seed: int = 1, counts: tuple[int, int, int] = (6, 3, 3)) -> dict:
  """RFMiD: three Set folders, ID + Disease_Risk + class columns, <ID>.png images; `counts`
  images in train, val and test."""
  rng = np.random.default_rng(seed)
  classes = ["DR", "ARMD", "MH"]
  truth = {}
  sets = (("train", "Training_Set", "RFMiD_Training_Labels.csv", "Training", counts[0], 1),
          ("val", "Evaluation_Set", "RFMiD_Validation_Labels.csv", "Validation", counts[1], 1),
          ("test", "Test_Set", "RFMiD_Testing_Labels.csv", "Test", counts[2], 1))
  for split, folder, csv_name, images, n, first in sets:
    labels = _labels(rng, n, len(classes))
    rows = []
    for i in range(n):
      image_id = str(first + i)  # RFMiD restarts its ids at 1 in every set
      colour = _colour(rng)
      _write_image(root / folder / images / f"{image_id}.png", colour)
      truth[(split, image_id)] = (colour, labels[i])
      rows.append([image_id, int(labels[i].any()), *map(int, labels[i])])
    _write_csv(root / folder / csv_name, ["ID", "Disease_Risk", *classes], rows)
  return {"classes": classes, "truth": truth}


def make_brset(root: Path, seed: int = 2, csv_name: str = "labels.csv", n: int = 12) -> dict:
  """BRSET: labels.csv with metadata + 13 disease columns, fundus_photos/<image_id>.jpg."""
  rng = np.random.default_rng(seed)
  labels = _labels(rng, n, len(BRSET_CLASSES))
  header = ["image_id", "patient_id", "camera", "patient_age", *BRSET_CLASSES, "quality"]
  rows, truth = [], {}
  for i in range(n):
    image_id = f"img{i + 1:05d}"
    colour = _colour(rng)
    _write_image(root / "fundus_photos" / f"{image_id}.jpg", colour)
    truth[image_id] = (colour, labels[i])
    rows.append([image_id, i // 2, "Canon CR", 50 + i, *map(int, labels[i]), "Adequate"])
  _write_csv(root / csv_name, header, rows)
  return {"classes": BRSET_CLASSES, "truth": truth}


def _check_split(split: Split, truth: dict, size: int = SIZE, atol: int = 0,
                 key=lambda image_id: image_id) -> None:
  assert split.images.dtype == np.uint8 and split.labels.dtype == np.uint8
  assert split.images.shape == (len(split), size, size, 3)
  assert split.ids is not None and len(split.ids) == len(split)
  for image, label, image_id in zip(split.images, split.labels, split.ids):
    colour, expected = truth[key(str(image_id))]
    np.testing.assert_array_equal(label, expected)
    diff = np.abs(image.astype(int) - colour.astype(int))
    assert diff.max() <= atol, (image_id, image[0, 0], colour)


# ------------------------------------------------------------------------------------------------
# Module-scoped fixtures: each layout is written and loaded once.


@pytest.fixture(scope="module")
def mured(tmp_path_factory):
  root = tmp_path_factory.mktemp("mured")
  meta = make_mured(root)
  return root, meta, load_csv_image_dataset("mured", str(root), SIZE)


@pytest.fixture(scope="module")
def rfmid(tmp_path_factory):
  root = tmp_path_factory.mktemp("rfmid")
  meta = make_rfmid(root)
  return root, meta, load_csv_image_dataset("rfmid", str(root), SIZE)


@pytest.fixture(scope="module")
def brset(tmp_path_factory):
  root = tmp_path_factory.mktemp("brset")
  meta = make_brset(root)
  return root, meta, load_csv_image_dataset("brset", str(root), SIZE)


def test_mured_loads_with_carved_val(mured):
  root, meta, ds = mured
  assert ds.name == "mured"
  assert ds.class_names == tuple(meta["classes"])
  assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 1, 4)
  for split in ds.splits().values():
    _check_split(split, meta["truth"])
  ids = [set(map(str, s.ids)) for s in ds.splits().values()]
  assert not ids[0] & ids[1] and ids[0] | ids[1] == {str(i) for i in range(1, 11)}
  assert ids[2] == {str(i) for i in range(100, 104)}
  assert ds.image_shape == (SIZE, SIZE, 3)
  assert "tensorflow" not in sys.modules  # the whole path runs without TensorFlow
  assert (root / ".fednml_cache" / "fednml_csv_images").is_dir()
  assert list((root / ".fednml_cache").rglob("*.array_record*"))


def test_rfmid_loads_official_splits(rfmid):
  _, meta, ds = rfmid
  assert ds.class_names == ("DR", "ARMD", "MH")  # Disease_Risk is not a class
  assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 3)
  for name, split in ds.splits().items():
    _check_split(split, meta["truth"], key=lambda i, name=name: (name, i))
    assert list(map(str, split.ids)) == [str(i) for i in range(1, len(split) + 1)]  # CSV order


def test_brset_loads_with_carved_test_and_val(brset):
  _, meta, ds = brset
  assert ds.class_names == tuple(BRSET_CLASSES)
  assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 1, 2)
  for split in ds.splits().values():
    _check_split(split, meta["truth"], atol=4)  # JPEG
  all_ids = [str(i) for s in ds.splits().values() for i in s.ids]
  assert sorted(all_ids) == sorted(meta["truth"])


def test_second_load_reads_the_cache_not_the_images(mured, monkeypatch):
  root, _, first = mured
  moved = root.parent / (root.name + "_images_aside")
  shutil.move(root / "images", moved)
  try:
    def no_decoding(*args, **kwargs):
      raise AssertionError("an image was decoded although the cache exists")
    monkeypatch.setattr(csv_images, "_load_image", no_decoding)
    second = load_csv_image_dataset("mured", str(root), SIZE)
  finally:
    shutil.move(moved, root / "images")
  for a, b in zip(first.splits().values(), second.splits().values()):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ids, b.ids)  # the carved val split is deterministic


def test_row_reader_reads_only_the_rows_asked_for():
  pixels = np.array([10, 20, 30, 40, 50], np.uint8).reshape(5, 1, 1, 1)
  calls = []

  def read(rows):
    calls.append(rows.tolist())
    return pixels[rows]

  reader = RowReader(read, (1, 1, 1), np.arange(5))
  assert reader.shape == (5, 1, 1, 1) and len(reader) == 5 and reader.rows_read == 0
  out = reader[np.array([[3, 1], [3, 0]])]  # a repeated row is read once
  assert out.shape == (2, 2, 1, 1, 1) and out.ravel().tolist() == [40, 20, 40, 10]
  assert calls == [[0, 1, 3]] and reader.rows_read == 3
  sub = reader.subset(np.array([False, True, False, True, True]))  # rows 1, 3, 4: nothing read
  assert calls == [[0, 1, 3]] and sub.shape == (3, 1, 1, 1)
  assert sub[2].ravel().tolist() == [50] and calls[-1] == [4]
  assert sub.rows_read == reader.rows_read == 4  # one count for a reader and its subsets
  assert sub[1:].ravel().tolist() == [40, 50]
  assert np.asarray(sub).ravel().tolist() == [20, 40, 50]
  taken = Split(reader, np.eye(5, dtype=np.uint8)).take(np.array([4, 0]))
  assert isinstance(taken.images, RowReader)
  assert np.asarray(taken.images).ravel().tolist() == [50, 10]
  assert taken.labels.argmax(1).tolist() == [4, 0]


def test_csv_splits_read_images_on_demand(rfmid):
  root, _, _ = rfmid
  ds = load_csv_image_dataset("rfmid", str(root), SIZE)  # the cache exists: nothing is read
  reader = ds.train.images
  assert isinstance(reader, RowReader) and reader.rows_read == 0
  part = reader[np.array([4, 1])]
  assert reader.rows_read == 2
  np.testing.assert_array_equal(part, np.asarray(reader)[[4, 1]])


def test_a_cache_record_out_of_place_is_reported(tmp_path):
  class Shuffled:  # a cache whose record i holds CSV row i + 1
    def __len__(self):
      return 2

    def __getitems__(self, rows):
      return [{"index": r + 1, "image": np.zeros((SIZE, SIZE, 3), np.uint8)} for r in rows]

  table = csv_images._Table("train", tmp_path / "a.csv", tmp_path, ("1", "2"),
                            np.zeros((2, 1), np.uint8), ("DR",))
  split = csv_images._read_split(Shuffled(), table, SIZE, tmp_path)
  with pytest.raises(DataError, match="damaged .*record 0 holds CSV row 1"):
    np.asarray(split.images)


def test_other_size_and_cache_dir_build_a_new_cache(rfmid, tmp_path):
  root, meta, _ = rfmid
  ds = load_csv_image_dataset("rfmid", str(root), 12, cache_dir=str(tmp_path / "cache"))
  assert ds.train.images.shape == (6, 12, 12, 3)
  _check_split(ds.test, meta["truth"], size=12, key=lambda i: ("test", i))
  assert list((tmp_path / "cache").rglob("*.array_record*"))


def test_accepted_variants(tmp_path):
  # FedNML's MuReD copy names the id column `Image Index`; recent BRSET ships labels_brset.csv.
  meta = make_mured(tmp_path / "m", id_column="Image Index", n_train=4, n_test=2)
  ds = load_csv_image_dataset("mured", str(tmp_path / "m"), SIZE)
  _check_split(ds.train, meta["truth"])
  meta = make_brset(tmp_path / "b", csv_name="labels_brset.csv", n=6)
  ds = load_csv_image_dataset("brset", str(tmp_path / "b"), SIZE)
  assert len(ds.train) + len(ds.val) + len(ds.test) == 6


def test_editing_the_csv_rebuilds_the_cache(tmp_path):
  root = tmp_path / "m"
  make_mured(root, n_train=4, n_test=2)
  ds = load_csv_image_dataset("mured", str(root), SIZE)
  rows = list(csv.reader(open(root / "test_data.csv")))
  rows[1][1] = "1" if rows[1][1] == "0" else "0"
  _write_csv(root / "test_data.csv", rows[0], rows[1:])
  ds2 = load_csv_image_dataset("mured", str(root), SIZE)
  assert ds2.test.labels[0, 0] == 1 - ds.test.labels[0, 0]


# ------------------------------------------------------------------------------------------------
# carve_validation


def _toy_split(n: int) -> Split:
  return Split(images=np.zeros((n, 2, 2, 3), np.uint8),
               labels=(np.arange(n)[:, None] % 2).astype(np.uint8),
               ids=np.asarray([f"id{i:03d}" for i in range(n)]))


def test_carve_validation_is_deterministic_and_order_free():
  split = _toy_split(50)
  train, val = carve_validation(split, 0.1, 0)
  assert (len(train), len(val)) == (45, 5)
  assert not set(train.ids) & set(val.ids)
  again = carve_validation(split, 0.1, 0)[1]
  np.testing.assert_array_equal(val.ids, again.ids)
  shuffled = split.take(np.random.default_rng(7).permutation(50))
  assert set(carve_validation(shuffled, 0.1, 0)[1].ids) == set(val.ids)
  assert set(carve_validation(split, 0.1, 1)[1].ids) != set(val.ids)
  assert len(carve_validation(_toy_split(3), 0.1, 0)[1]) == 1  # at least one row


def test_carve_validation_rejects_bad_input():
  with pytest.raises(ConfigError, match="between 0 and 1"):
    carve_validation(_toy_split(10), 1.5, 0)
  with pytest.raises(DataError, match="at least 2"):
    split_off(_toy_split(1), 0.2, 0, what="test")


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("layout,where", [("mured", "Mendeley Data"), ("rfmid", "IEEE DataPort"),
                                          ("brset", "PhysioNet")])
def test_missing_root(tmp_path, layout, where):
  with pytest.raises(DataError, match="does not exist") as err:
    load_csv_image_dataset(layout, str(tmp_path / "nope"), SIZE)
  assert where in str(err.value) and "data/README.md" in str(err.value)
  assert "\n" not in str(err.value)


def test_unknown_layout_and_bad_size(tmp_path):
  with pytest.raises(ConfigError, match="Unknown CSV dataset layout"):
    load_csv_image_dataset("odir", str(tmp_path), SIZE)
  with pytest.raises(ConfigError, match="image_size"):
    load_csv_image_dataset("mured", str(tmp_path), 0)
  with pytest.raises(DataError, match="No folder was given"):
    load_csv_image_dataset("mured", "", SIZE)


def test_missing_csv(tmp_path):
  make_mured(tmp_path, n_train=3, n_test=2)
  (tmp_path / "test_data.csv").unlink()
  with pytest.raises(DataError, match="test_data.csv") as err:
    load_csv_image_dataset("mured", str(tmp_path), SIZE)
  assert "was not found" in str(err.value) and "Mendeley" in str(err.value)


def test_missing_id_column(tmp_path):
  make_rfmid(tmp_path)
  path = tmp_path / "Test_Set" / "RFMiD_Testing_Labels.csv"
  rows = list(csv.reader(open(path)))
  rows[0][0] = "Image"
  _write_csv(path, rows[0], rows[1:])
  with pytest.raises(DataError, match="has no id column") as err:
    load_csv_image_dataset("rfmid", str(tmp_path), SIZE)
  assert "RFMiD_Testing_Labels.csv" in str(err.value) and "'ID'" in str(err.value)


def test_label_not_binary(tmp_path):
  make_mured(tmp_path, n_train=3, n_test=2)
  rows = list(csv.reader(open(tmp_path / "train_data.csv")))
  rows[2][3] = "2"  # column MH of image 2
  _write_csv(tmp_path / "train_data.csv", rows[0], rows[1:])
  with pytest.raises(DataError, match="must hold 0 or 1") as err:
    load_csv_image_dataset("mured", str(tmp_path), SIZE)
  assert "'MH'" in str(err.value) and "'2'" in str(err.value) and "train_data.csv" in str(err.value)


def test_missing_brset_class_column(tmp_path):
  make_brset(tmp_path, n=4)
  rows = list(csv.reader(open(tmp_path / "labels.csv")))
  keep = [i for i, h in enumerate(rows[0]) if h != "nevus"]
  _write_csv(tmp_path / "labels.csv", [rows[0][i] for i in keep],
             [[r[i] for i in keep] for r in rows[1:]])
  with pytest.raises(DataError, match="lacks the class column"):
    load_csv_image_dataset("brset", str(tmp_path), SIZE)


def test_missing_image(tmp_path):
  make_brset(tmp_path, n=4)
  (tmp_path / "fundus_photos" / "img00003.jpg").unlink()
  with pytest.raises(DataError, match="missing") as err:
    load_csv_image_dataset("brset", str(tmp_path), SIZE)
  assert "'img00003'" in str(err.value) and "labels.csv" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "not_an_image"])
def test_bad_image_file(tmp_path, damage):
  make_mured(tmp_path, n_train=3, n_test=2)
  bad = tmp_path / "images" / "2.png"
  if damage == "truncate":
    bad.write_bytes(bad.read_bytes()[:60])
  else:
    bad.write_text("this is not a picture")
  with pytest.raises(DataError, match="Could not decode the image") as err:
    load_csv_image_dataset("mured", str(tmp_path), SIZE)
  assert str(bad) in str(err.value)
  # Nothing half-built is kept: after fixing the file the load succeeds.
  _write_image(bad, np.array([1, 2, 3], np.uint8))
  ds = load_csv_image_dataset("mured", str(tmp_path), SIZE)
  assert len(ds.train) + len(ds.val) == 3


def test_empty_split(tmp_path):
  make_mured(tmp_path, n_train=3, n_test=2)
  _write_csv(tmp_path / "test_data.csv", ["ID", "DR", "NORMAL", "MH", "ODC"], [])
  with pytest.raises(DataError, match="lists no images") as err:
    load_csv_image_dataset("mured", str(tmp_path), SIZE)
  assert "test_data.csv" in str(err.value)
