"""CSV + image-folder datasets (MuReD, RFMiD, BRSET), cached with a tensorflow-datasets builder.

Each of these datasets is published as one CSV per split (an id column plus one 0/1 column per
class) and a folder of fundus photographs named by id. `load_csv_image_dataset` checks the files,
decodes and resizes every image once, and stores the result with a `tfds` builder in the
`array_record` format under `cache_dir` (default `<root>/.fednml_cache`), record `i` holding CSV
row `i`. Later loads take labels and ids from the CSV files and read images from that cache through
`builder.as_data_source()` (random access; neither TensorFlow nor the original images needed) only
when they are asked for: the splits' images are `RowReader`s, so a process of a multi-host run
reads only its own clients' training images.

The cache is keyed by layout, image size and a hash of the CSV files, so editing a CSV or asking
for another image size builds a new cache next to the old one (delete stale ones by hand).

Published layouts (see `data/README.md` for downloads and credits):

* MuReD: `train_data.csv`, `test_data.csv` (id column `ID`, or `Image Index` in FedNML's copy) and
  `images/<id>[.png|.tif|...]`. No validation split: 10% of train is carved off with seed 0.
* RFMiD: `Training_Set/RFMiD_Training_Labels.csv` + `Training_Set/Training/<ID>.png`,
  `Evaluation_Set/RFMiD_Validation_Labels.csv` + `Evaluation_Set/Validation/<ID>.png`,
  `Test_Set/RFMiD_Testing_Labels.csv` + `Test_Set/Test/<ID>.png`. `Disease_Risk` is not a class.
  (The Kaggle mirror's doubled folders, e.g. `Training_Set/Training_Set/...`, are accepted too.)
* BRSET: `labels.csv` (or `labels_brset.csv`) + `fundus_photos/<image_id>.jpg`; the 13 disease
  columns are the classes. No official split: 20% test, then 10% of the rest as validation, both
  carved with seed 0.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from fednml_jax.data.splits import carve_validation, split_off
from fednml_jax.data.types import Dataset, RowReader, Split
from fednml_jax.errors import ConfigError, DataError

__all__ = ["LAYOUTS", "load_csv_image_dataset", "default_cache_dir"]

# Bump when the decoding or the stored format changes, so that old caches are not reused.
_CACHE_FORMAT = "2"  # 2: records unshuffled (record i = CSV row i)
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_VAL_FRACTION = 0.1
_TEST_FRACTION = 0.2
_CARVE_SEED = 0  # fixed: the carved splits must never depend on the run seed
_READ_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class _SplitSpec:
  """Where one split lives: candidate CSV paths (first found wins) and the image folder."""

  split: str  # "train", "val", "test", or "full" (carved into all three later)
  csv: tuple[str, ...]  # relative to the dataset root
  images: str  # relative to the folder holding the CSV that was found


@dataclasses.dataclass(frozen=True)
class _Layout:
  name: str
  title: str
  splits: tuple[_SplitSpec, ...]
  id_columns: tuple[str, ...]  # accepted names of the id column, first match wins
  ignored_columns: tuple[str, ...]  # non-class columns to skip when classes are "all the rest"
  class_columns: tuple[str, ...] | None  # fixed class columns; None: every other column
  extensions: tuple[str, ...]  # tried, in order, after the id as-is
  source: str  # where to download it
  expected: str  # the expected folder layout, in words
  homepage: str


LAYOUTS: dict[str, _Layout] = {
    "mured": _Layout(
        name="mured",
        title="MuReD (Multi-Label Retinal Diseases)",
        splits=(_SplitSpec("train", ("train_data.csv",), "images"),
                _SplitSpec("test", ("test_data.csv",), "images")),
        id_columns=("ID", "Image Index"),
        ignored_columns=(),
        class_columns=None,
        extensions=_IMAGE_EXTENSIONS,
        source=("Mendeley Data (https://data.mendeley.com/datasets/pc4mb3h8hz, "
                "doi:10.17632/pc4mb3h8hz)"),
        expected=("`train_data.csv` and `test_data.csv` (an `ID` or `Image Index` column plus one "
                  "0/1 column per class) and an `images/` folder holding the images named by id "
                  "(with or without the .png/.tif extension)"),
        homepage="https://data.mendeley.com/datasets/pc4mb3h8hz",
    ),
    "rfmid": _Layout(
        name="rfmid",
        title="RFMiD (Retinal Fundus Multi-Disease Image Dataset)",
        splits=(
            _SplitSpec("train", ("Training_Set/RFMiD_Training_Labels.csv",
                                 "Training_Set/Training_Set/RFMiD_Training_Labels.csv"),
                       "Training"),
            _SplitSpec("val", ("Evaluation_Set/RFMiD_Validation_Labels.csv",
                               "Evaluation_Set/Evaluation_Set/RFMiD_Validation_Labels.csv"),
                       "Validation"),
            _SplitSpec("test", ("Test_Set/RFMiD_Testing_Labels.csv",
                                "Test_Set/Test_Set/RFMiD_Testing_Labels.csv"), "Test"),
        ),
        id_columns=("ID",),
        ignored_columns=("Disease_Risk",),
        class_columns=None,
        extensions=_IMAGE_EXTENSIONS,
        source=("IEEE DataPort (https://ieee-dataport.org/open-access/"
                "retinal-fundus-multi-disease-image-dataset-rfmid, doi:10.21227/s3g7-st65)"),
        expected=("`Training_Set/RFMiD_Training_Labels.csv` with images in "
                  "`Training_Set/Training/<ID>.png`, "
                  "`Evaluation_Set/RFMiD_Validation_Labels.csv` with "
                  "`Evaluation_Set/Validation/<ID>.png` and "
                  "`Test_Set/RFMiD_Testing_Labels.csv` with `Test_Set/Test/<ID>.png`; each CSV "
                  "has an `ID` column, a `Disease_Risk` column and one 0/1 column per disease"),
        homepage=("https://ieee-dataport.org/open-access/"
                  "retinal-fundus-multi-disease-image-dataset-rfmid"),
    ),
    "brset": _Layout(
        name="brset",
        title="BRSET (Brazilian Multilabel Ophthalmological Dataset)",
        splits=(_SplitSpec("full", ("labels.csv", "labels_brset.csv"), "fundus_photos"),),
        id_columns=("image_id",),
        ignored_columns=(),
        class_columns=("diabetic_retinopathy", "macular_edema", "scar", "nevus", "amd",
                       "vascular_occlusion", "hypertensive_retinopathy", "drusens", "hemorrhage",
                       "retinal_detachment", "myopic_fundus", "increased_cup_disc", "other"),
        extensions=(".jpg", ".jpeg", ".png", ".tif", ".tiff"),
        source=("PhysioNet (https://physionet.org/content/brazilian-ophthalmological/, "
                "doi:10.13026/xcxw-8198; credentialed access)"),
        expected=("`labels.csv` (or `labels_brset.csv`) with an `image_id` column and the disease "
                  "columns diabetic_retinopathy ... other, and a `fundus_photos/` folder holding "
                  "`<image_id>.jpg`"),
        homepage="https://physionet.org/content/brazilian-ophthalmological/",
    ),
}


def default_cache_dir(root: str | os.PathLike) -> Path:
  """Where `load_csv_image_dataset` keeps its prepared cache unless told otherwise."""
  return Path(root).expanduser() / ".fednml_cache"


# ----------------------------------------------------------------------------------------------
# CSV parsing


@dataclasses.dataclass(frozen=True)
class _Table:
  """One parsed CSV: the rows of one split."""

  split: str
  csv_path: Path
  image_dir: Path
  ids: tuple[str, ...]
  labels: np.ndarray  # uint8 (N, C)
  class_names: tuple[str, ...]


def _where_to_get(layout: _Layout, root: Path) -> str:
  return (f"{layout.title} is expected under {root} as {layout.expected}. Download it from "
          f"{layout.source}; data/README.md in this repository shows the exact folder layout.")


def _find_csv(layout: _Layout, spec: _SplitSpec, root: Path) -> Path:
  for rel in spec.csv:
    if (root / rel).is_file():
      return root / rel
  tried = " or ".join(str(root / rel) for rel in spec.csv)
  raise DataError(f"The {spec.split} labels file of {layout.title} was not found: looked for "
                  f"{tried}. " + _where_to_get(layout, root))


def _parse_binary(text: str) -> int | None:
  text = text.strip()
  if text in ("0", "1"):
    return int(text)
  try:
    value = float(text)
  except ValueError:
    return None
  return int(value) if value in (0.0, 1.0) else None


def _read_table(layout: _Layout, spec: _SplitSpec, root: Path) -> _Table:
  path = _find_csv(layout, spec, root)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"Could not read {path} as a UTF-8 CSV file ({e}). It should be the "
                    f"{spec.split} labels file of {layout.title}: {layout.expected}. Re-download "
                    f"it from {layout.source}.") from e
  rows = [r for r in rows if any(cell.strip() for cell in r)]
  if not rows:
    raise DataError(f"{path} is empty; it should hold a header and one row per image of the "
                    f"{spec.split} split of {layout.title} ({layout.expected}). Re-download it "
                    f"from {layout.source}.")
  header = [h.strip() for h in rows[0]]
  id_col = next((c for c in layout.id_columns if c in header), None)
  if id_col is None:
    shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    raise DataError(f"{path} has no id column: expected a column named "
                    f"{' or '.join(repr(c) for c in layout.id_columns)}, found the columns "
                    f"[{shown}]. The {layout.title} labels files need {layout.expected}.")
  id_index = header.index(id_col)
  if layout.class_columns is not None:
    missing = [c for c in layout.class_columns if c not in header]
    if missing:
      raise DataError(f"{path} lacks the class column(s) {', '.join(missing)}. The "
                      f"{layout.title} labels file must have {layout.expected}; re-download it "
                      f"from {layout.source}.")
    class_names = tuple(layout.class_columns)
  else:
    skip = {id_col, *layout.ignored_columns}
    class_names = tuple(h for h in header if h and h not in skip)
    if not class_names:
      raise DataError(f"{path} has no class columns besides {id_col!r}; it needs one 0/1 column "
                      f"per class ({layout.expected}).")
  if len(set(class_names)) != len(class_names):
    dup = sorted({c for c in class_names if class_names.count(c) > 1})
    raise DataError(f"{path} has duplicate class columns {', '.join(dup)}; each class must "
                    "appear once in the header.")
  class_index = [header.index(c) for c in class_names]

  ids: list[str] = []
  labels = np.zeros((len(rows) - 1, len(class_names)), dtype=np.uint8)
  for r, row in enumerate(rows[1:]):
    line = r + 2  # 1-based, after the header (blank lines are not counted)
    if len(row) < len(header):
      raise DataError(f"{path}, data row {line - 1}: {len(row)} fields for {len(header)} "
                      "columns in the header. Every row needs one value per column; the file "
                      "may be truncated or edited by hand.")
    image_id = row[id_index].strip()
    if not image_id:
      raise DataError(f"{path}, data row {line - 1}: the id column {id_col!r} is empty. Every "
                      "row must name its image file.")
    ids.append(image_id)
    for c, (name, col) in enumerate(zip(class_names, class_index)):
      value = _parse_binary(row[col])
      if value is None:
        raise DataError(f"{path}: class column {name!r} must hold 0 or 1, but the row for image "
                        f"{image_id!r} has {row[col]!r}. {layout.title} labels are one 0/1 "
                        "column per class; fix or re-download the file.")
      labels[r, c] = value
  if not ids:
    raise DataError(f"{path} lists no images: the {spec.split} split of {layout.title} would be "
                    f"empty. It needs a header and one row per image; re-download it from "
                    f"{layout.source}.")
  seen: set[str] = set()
  dups: list[str] = []
  for image_id in ids:
    if image_id in seen:
      dups.append(image_id)
    seen.add(image_id)
  if dups:
    raise DataError(f"{path} lists the image id(s) {', '.join(repr(d) for d in dups[:5])} more "
                    "than once; each image must appear in one row only.")
  return _Table(split=spec.split, csv_path=path, image_dir=path.parent / spec.images,
                ids=tuple(ids), labels=labels, class_names=class_names)


def _check_same_classes(layout: _Layout, tables: Sequence[_Table]) -> None:
  first = tables[0]
  for t in tables[1:]:
    if t.class_names != first.class_names:
      only_a = [c for c in first.class_names if c not in t.class_names]
      only_b = [c for c in t.class_names if c not in first.class_names]
      detail = (f"only in the first: {only_a or 'none'}; only in the second: {only_b or 'none'}"
                if only_a or only_b else "same columns in a different order")
      raise DataError(f"The class columns of {first.csv_path} and {t.csv_path} differ ({detail}). "
                      f"All {layout.title} label files must have the same class columns in the "
                      "same order.")


# ----------------------------------------------------------------------------------------------
# Images


def _resolve_images(layout: _Layout, table: _Table) -> list[Path]:
  """The image file of every row of `table`; raises DataError naming missing ones."""
  if not table.image_dir.is_dir():
    raise DataError(f"The image folder {table.image_dir} for {table.csv_path} does not exist. "
                    f"{layout.title} needs {layout.expected}. Download the images from "
                    f"{layout.source}.")
  present = set(os.listdir(table.image_dir))
  exts = [e for ext in layout.extensions for e in (ext, ext.upper())]
  paths: list[Path] = []
  missing: list[str] = []
  for image_id in table.ids:
    name = next((n for n in (image_id, *(image_id + e for e in exts)) if n in present), None)
    if name is None:
      missing.append(image_id)
    else:
      paths.append(table.image_dir / name)
  if missing:
    shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
    raise DataError(f"{len(missing)} image(s) listed in {table.csv_path} are missing from "
                    f"{table.image_dir}: {shown} (tried the id as-is and with the extensions "
                    f"{', '.join(layout.extensions)}). Make sure the image archive of "
                    f"{layout.title} from {layout.source} was fully extracted there.")
  return paths


def _load_image(path: Path, size: int) -> np.ndarray:
  """Reads one image as RGB uint8 and resizes it (bilinear, antialiased) to size x size."""
  try:
    with Image.open(path) as im:
      # JPEG only: decode at the smallest 1/2, 1/4 or 1/8 scale that is still >= size x size
      # (several times faster on full-size fundus photos); the resize below does the rest.
      im.draft("RGB", (size, size))
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: keep the top 8 bits
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8), "L")
      rgb = im.convert("RGB")
      rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
      return np.asarray(rgb, dtype=np.uint8)
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
    raise DataError(f"Could not decode the image {path}: it is truncated, corrupt or not an "
                    f"image ({type(e).__name__}: {e}). Re-extract or re-download that file, or "
                    "remove its row from the CSV file.") from e


# ----------------------------------------------------------------------------------------------
# The tfds builder


@dataclasses.dataclass(eq=False)
class CsvImagesConfig(tfds.core.BuilderConfig):
  """One cache: a layout at one image size for one version of its CSV files."""

  layout: str = ""
  image_size: int = 0
  class_names: tuple[str, ...] = ()
  split_names: tuple[str, ...] = ()


class CsvImagesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Decoded, resized images and multi-hot labels of a CSV + image-folder dataset.

  Built from a manual download (`manual_dir` is the dataset root); `tables` (the parsed CSVs) is
  only needed to build, not to read a prepared cache.
  """

  name = "fednml_csv_images"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download the dataset yourself (see data/README.md) and pass "
                                  "its folder as the root; it cannot be downloaded automatically.")
  # No checksums file sits next to this module (nothing is downloaded). Leaving `code_path` to
  # tfds would also crash on Python >= 3.9 without the `importlib_resources` backport, which tfds
  # 4.9.x uses but only declares for Python < 3.9 (tensorflow/datasets#11212).
  code_path = None

  def __init__(self, *, tables: Sequence[_Table] | None = None, **kwargs):
    self._tables = tuple(tables or ())
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: CsvImagesConfig = self.builder_config  # type: ignore[assignment]
    layout = LAYOUTS[cfg.layout]
    size = cfg.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{layout.title}, images resized to {size}x{size} RGB, multi-hot labels over "
                    f"{len(cfg.class_names)} classes: {', '.join(cfg.class_names)}.",
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default stores every pixel as an int64 (8x the size, far slower).
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                          encoding="bytes"),
            "label": tfds.features.Tensor(shape=(len(cfg.class_names),), dtype=np.uint8),
            "index": tfds.features.Scalar(dtype=np.int64),  # row in the CSV (restores order)
            "id": tfds.features.Text(),
        }),
        homepage=layout.homepage,
        disable_shuffling=True,  # record i is CSV row i: a process reads only the rows it needs
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the parsed tables
    if not self._tables:
      raise RuntimeError("CsvImagesBuilder needs `tables` to build a cache.")
    return {t.split: self._generate_examples(t) for t in self._tables}

  def _generate_examples(self, table: _Table) -> Iterator[tuple[int, dict]]:
    cfg: CsvImagesConfig = self.builder_config  # type: ignore[assignment]
    paths = _resolve_images(LAYOUTS[cfg.layout], table)
    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = 64 * workers
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for start in range(0, len(paths), chunk):
        stop = min(start + chunk, len(paths))
        images = pool.map(_load_image, paths[start:stop], [cfg.image_size] * (stop - start))
        for i, image in zip(range(start, stop), images):
          yield i, {"image": image, "label": table.labels[i], "index": i, "id": table.ids[i]}


class _DropExpectedTfdsWarnings(logging.Filter):
  """Drops tfds warnings that are expected here and would only confuse a user."""

  _EXPECTED = ("Using custom data configuration",  # our BuilderConfig is made per call
               "has no dataset_info.json")  # the cache folder before its first build

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(e in message for e in self._EXPECTED)


@contextlib.contextmanager
def _quiet_tfds():
  """Silences `_DropExpectedTfdsWarnings` on tfds' (absl) logger for the duration."""
  logger = logging.getLogger("absl")
  flt = _DropExpectedTfdsWarnings()
  logger.addFilter(flt)
  try:
    yield
  finally:
    logger.removeFilter(flt)


def _fingerprint(layout: _Layout, tables: Sequence[_Table], size: int) -> str:
  h = hashlib.sha256()
  h.update(f"{_CACHE_FORMAT}|{layout.name}|{size}".encode())
  for t in tables:
    h.update(f"|{t.split}|{t.csv_path.name}|".encode())
    h.update(t.csv_path.read_bytes())
  return h.hexdigest()[:12]


def _read_split(source, table: _Table, size: int, cache_path: Path) -> Split:
  """The split's labels and ids from its CSV and its images as a `RowReader` over the cache
  (record `i` is CSV row `i`: the cache is written unshuffled), read only when asked for."""
  n = len(table.ids)
  if len(source) != n:
    raise DataError(f"The cache in {cache_path} holds {len(source)} {table.split} images but "
                    f"{table.csv_path} lists {n}; the cache is stale or damaged. Delete "
                    f"{cache_path} and load again to rebuild it.")

  def read(rows: np.ndarray) -> np.ndarray:
    images = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for start in range(0, len(rows), _READ_CHUNK):
      chunk = rows[start:start + _READ_CHUNK]
      for j, (row, rec) in enumerate(zip(chunk, source.__getitems__(chunk.tolist()))):
        if int(rec["index"]) != row:
          raise DataError(f"The cache in {cache_path} is damaged ({table.split} record {row} holds "
                          f"CSV row {int(rec['index'])}). Delete {cache_path} and load again to "
                          "rebuild it.")
        images[start + j] = rec["image"]
    return images

  return Split(images=RowReader(read, (size, size, 3), np.arange(n)), labels=table.labels,
               ids=np.asarray(table.ids))


def _cached_splits(layout: _Layout, root: Path, tables: Sequence[_Table], size: int,
                   cache_dir: Path) -> dict[str, Split]:
  config = CsvImagesConfig(
      name=f"{layout.name}_{size}px_{_fingerprint(layout, tables, size)}",
      description=f"{layout.title} at {size}x{size} px",
      layout=layout.name, image_size=size, class_names=tables[0].class_names,
      split_names=tuple(t.split for t in tables))
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"Cannot create the dataset cache folder {cache_dir} ({e}). Pass a writable "
                    "folder as the cache directory (`cache_dir`).") from e
  with _quiet_tfds():
    builder = CsvImagesBuilder(tables=tables, data_dir=str(cache_dir), config=config)
    cache_path = Path(str(builder.data_path))
    if not builder.is_prepared():
      for t in tables:  # fail fast, before tfds starts writing, if any image is missing
        _resolve_images(layout, t)
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=str(root),
                                                       try_download_gcs=False))
  try:
    sources = builder.as_data_source()
  except Exception as e:  # e.g. a half-deleted cache folder
    raise DataError(f"Could not read the dataset cache in {cache_path} ({type(e).__name__}: {e}). "
                    f"Delete {cache_path} and load again to rebuild it.") from e
  return {t.split: _read_split(sources[t.split], t, size, cache_path) for t in tables}


# ----------------------------------------------------------------------------------------------
# Public entry point


def load_csv_image_dataset(layout: str, root: str, image_size: int,
                           cache_dir: str | None = None) -> Dataset:
  """Loads MuReD, RFMiD or BRSET from its published CSV + image-folder layout.

  Args:
    layout: "mured", "rfmid" or "brset".
    root: the folder holding the downloaded dataset (e.g. `data/mured`).
    image_size: images are resized once to `image_size` x `image_size` RGB.
    cache_dir: where the prepared tfds cache goes; default `<root>/.fednml_cache`.

  Returns:
    A `Dataset` named after the layout whose class names are the CSV's class columns in order
    (rare classes are kept). Splits missing from the publication are carved deterministically
    (seed 0): MuReD's validation split is 10% of train; BRSET's test split is 20% of all images
    and its validation split 10% of the rest.

  Raises:
    ConfigError: unknown layout or bad image size.
    DataError: missing or malformed files (the message says which and what to do).
  """
  if layout not in LAYOUTS:
    raise ConfigError(f"Unknown CSV dataset layout {layout!r}; choose one of "
                      f"{', '.join(sorted(LAYOUTS))}.")
  spec = LAYOUTS[layout]
  if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
      or not 8 <= int(image_size) <= 4096:
    raise ConfigError(f"image_size must be an integer number of pixels between 8 and 4096, got "
                      f"{image_size!r}.")
  size = int(image_size)
  if root is None or not str(root).strip():
    raise DataError(f"No folder was given for {spec.title}: set the dataset path "
                    f"(config.data.path) to the folder holding {spec.expected}. Download it from "
                    f"{spec.source}; data/README.md shows the exact folder layout.")
  root_path = Path(root).expanduser()
  if not root_path.is_dir():
    raise DataError(f"The {spec.title} folder {root_path} does not exist. "
                    + _where_to_get(spec, root_path))
  tables = [_read_table(spec, s, root_path) for s in spec.splits]
  _check_same_classes(spec, tables)
  cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(root_path)
  splits = _cached_splits(spec, root_path, tables, size, cache)

  if "full" in splits:
    rest, test = split_off(splits["full"], _TEST_FRACTION, _CARVE_SEED, what="test")
    train, val = carve_validation(rest, _VAL_FRACTION, _CARVE_SEED)
  else:
    train, test = splits["train"], splits["test"]
    if "val" in splits:
      val = splits["val"]
    else:
      train, val = carve_validation(train, _VAL_FRACTION, _CARVE_SEED)
  return Dataset(name=layout, train=train, val=val, test=test,
                 class_names=tables[0].class_names)
