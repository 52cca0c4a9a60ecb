"""MedMNIST-layout `.npz` files: `train_images`, `train_labels`, `val_*`, `test_*`.

Images are grey (N, H, W) or colour (N, H, W, 3) uint8; labels are (N, C) multi-hot. Optional keys:
`label_names` (C,) and per-split ids (`<split>_ids` or `<split>_image_index`). This reads MedMNIST
files and the shared 64-px RFMiD and NIH ChestX-ray14 files. A file without `val_*` gets a
validation split carved from its training split.

Images stored uncompressed (`np.savez`) are read on demand: a split's images are then a
`RowReader` over a memory map of the archive member, so a process of a multi-host run reads only
its own clients' training images. Compressed members (`np.savez_compressed`, as MedMNIST ships its
files) can only be decompressed whole, so every process reads all of them; for a multi-host run
on a large file, write it once with `np.savez`.
"""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np

from fednml_jax.data.splits import carve_validation
from fednml_jax.data.types import Dataset, RowReader, Split, as_image_array, as_label_array
from fednml_jax.errors import DataError

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local file header


def stored_images(path: str, archive: zipfile.ZipFile, key: str) -> RowReader | None:
  """The images of the member `key` of the `.npz` at `path` (open as `archive`) as a `RowReader`
  over a memory map, when the member is stored uncompressed and holds uint8 (N, H, W) or
  (N, H, W, 1 or 3) images in C order; otherwise None (read it whole)."""
  try:
    info = archive.getinfo(key + ".npy")
  except KeyError:
    return None
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with archive.open(info) as member:
    version = np.lib.format.read_magic(member)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read_header(member)
    header_size = member.tell()
  if (fortran_order or dtype != np.uint8 or len(shape) not in (3, 4) or shape[0] == 0
      or (len(shape) == 4 and shape[-1] not in (1, 3))):
    return None
  try:
    with open(path, "rb") as f:  # the member's data follow its local header
      f.seek(info.header_offset)
      local = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    start = info.header_offset + _LOCAL_HEADER.size + local[-2] + local[-1] + header_size
    pixels = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=shape)
  except (OSError, ValueError, struct.error):  # a damaged file: reading it whole reports how
    return None
  image_shape = tuple(shape[1:]) if len(shape) == 4 else tuple(shape[1:]) + (1,)
  return RowReader(lambda rows: np.asarray(pixels[rows]).reshape((len(rows),) + image_shape),
                   image_shape, np.arange(shape[0]))


def _read_split(archive, path, split):
  keys = (f"{split}_images", f"{split}_labels")
  missing = [k for k in keys if k not in archive.files]
  if missing:
    raise DataError(
        f"{path} lacks the array(s) {missing}. A MedMNIST-layout .npz needs `train_images`, "
        "`train_labels`, `test_images` and `test_labels` (and optionally `val_*` and `label_names`).")
  where = f"{path} [{split}]"
  images = stored_images(path, archive.zip, keys[0])
  if images is None:
    images = as_image_array(archive[keys[0]], where)  # checks and reports what is wrong
  labels = as_label_array(archive[keys[1]], len(images), where)
  if len(images) == 0:
    raise DataError(f"{where}: the {split} split is empty; every split needs at least one image.")
  ids = None
  for key in (f"{split}_ids", f"{split}_image_index"):
    if key in archive.files and len(archive[key]) == len(images):
      ids = np.asarray(archive[key])
      break
  return Split(images, labels, ids)


def load_npz(path: str, val_fraction: float = 0.1) -> Dataset:
  """Reads a MedMNIST-layout `.npz` file into a `Dataset`."""
  if not os.path.isfile(path):
    raise DataError(
        f"No .npz file at {path!r}. Set --config.data.path to a MedMNIST-layout file; the shared "
        "real data lives at ../shared/data/rfmid_dev_64px.npz and "
        "../shared/data/nih_cxr14_1000_64px.npz.")
  try:
    archive = np.load(path, allow_pickle=False)
    files = archive.files
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    raise DataError(f"{path} is not a readable .npz archive ({err}).") from None
  with archive:
    if "train_images" not in files and "images" in files:
      raise DataError(f"{path} has a single `images` array; a MedMNIST-layout file is split into "
                      "`train_*`, `val_*` and `test_*` arrays.")
    train = _read_split(archive, path, "train")
    test = _read_split(archive, path, "test")
    has_val = "val_images" in files or "val_labels" in files
    val = _read_split(archive, path, "val") if has_val else None
    num_classes = train.labels.shape[1]
    if "label_names" in files:
      names = tuple(str(n) for n in archive["label_names"])
      if len(names) != num_classes:
        raise DataError(f"{path}: `label_names` has {len(names)} names for {num_classes} label "
                        "columns.")
    else:
      names = tuple(f"class_{c}" for c in range(num_classes))
  for split in (test, val):
    if split is not None and split.labels.shape[1] != num_classes:
      raise DataError(f"{path}: splits disagree on the number of classes "
                      f"({num_classes} in train, {split.labels.shape[1]} elsewhere).")
    if split is not None and split.images.shape[1:] != train.images.shape[1:]:
      raise DataError(f"{path}: splits disagree on the image shape "
                      f"({train.images.shape[1:]} in train, {split.images.shape[1:]} elsewhere).")
  if val is None:
    train, val = carve_validation(train, val_fraction, seed=0)
  name = os.path.splitext(os.path.basename(path))[0]
  return Dataset(name, train, val, test, names)
