"""Saving model variables and initialising a model from a local weights file.

Nothing is downloaded. Two file formats are read:

* flax msgpack: `flax.serialization.to_bytes` of a variables dict
  `{'params': ..., 'batch_stats': ...}`; `save_variables` writes this format;
* numpy `.npz`: one array per leaf, keyed by the '/'-joined path of the leaf in the variables
  dict, e.g. `params/conv1/kernel`, `params/layer1_0/bn1/scale`, `batch_stats/bn1/mean`.

`load_pretrained` replaces every leaf of the model whose path is in the file with an array of the
same shape, and skips the rest: a head trained for another number of labels has another shape and
keeps its fresh initialisation. It logs how many leaves were loaded and skipped, and refuses a
file that is missing, unreadable or that matches no leaf at all.

Converting torchvision ResNet weights (not implemented here; a sketch). The flax ResNet keeps
torchvision's layer names, so for each `(name, tensor)` of a torchvision `state_dict()`:

* replace `layerI.J.` with `layerI_J/`, `downsample.0` with `downsample_conv`, `downsample.1`
  with `downsample_bn`, `fc` with `head`, and the remaining dots with '/';
* convolution `weight` (O, I, kH, kW) -> `params/.../kernel`, transposed to (kH, kW, I, O);
* `fc.weight` (O, I) -> `params/head/kernel`, transposed to (I, O); `fc.bias` -> `params/head/bias`;
* norm `weight` -> `params/.../scale`, `bias` -> `params/.../bias`;
* `running_mean` -> `batch_stats/.../mean`, `running_var` -> `batch_stats/.../var`;
  `num_batches_tracked` has no counterpart and is dropped;

then `numpy.savez(path, **arrays)`. Note that flax's BatchNorm updates its running variance with
the biased batch variance where PyTorch uses the unbiased one: loaded statistics are identical,
only later updates differ slightly.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import zipfile
from typing import Any, Mapping, Sequence

from absl import logging
import flax.serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fednml_jax.errors import ConfigError

SEP = "/"


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `load_pretrained` did with each leaf."""

  loaded: tuple[str, ...]  # model leaves replaced from the file
  shape_mismatch: tuple[str, ...]  # in both, but with another shape: kept as initialised
  missing: tuple[str, ...]  # model leaves absent from the file: kept as initialised
  unused: tuple[str, ...]  # file entries that are no leaf of the model
  excluded: tuple[str, ...]  # model leaves skipped because of `exclude`

  @property
  def skipped(self) -> int:
    """The number of model leaves kept as initialised."""
    return len(self.shape_mismatch) + len(self.missing) + len(self.excluded)

  def summary(self) -> str:
    text = (f"loaded {len(self.loaded)} leaves, skipped {self.skipped} "
            f"({len(self.shape_mismatch)} with another shape, {len(self.missing)} not in the "
            f"file, {len(self.excluded)} excluded); {len(self.unused)} file entries unused")
    if self.shape_mismatch:
      text += f"; shape mismatch: {', '.join(self.shape_mismatch[:8])}"
      if len(self.shape_mismatch) > 8:
        text += ", ..."
    return text


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The leaves of a nested variables dict, keyed by their '/'-joined paths."""
  return traverse_util.flatten_dict(variables, sep=SEP)


def save_variables(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes `variables` to `path` as flax msgpack (readable by `load_pretrained`).

  The file is written next to its destination and renamed into place, so a crash never leaves a
  truncated file; missing parent folders are created.
  """
  path = os.fspath(path)
  state = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
  data = flax.serialization.to_bytes(state)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".msgpack")
  try:
    with os.fdopen(handle, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of a msgpack or `.npz` weights file, keyed by '/'-joined paths.

  Raises `ConfigError` when the file is missing or is neither format.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(
        f"Pretrained weights file {path!r} does not exist. Give the path of a local flax msgpack "
        "file (written by fednml_jax.models.save_variables) or of an .npz file keyed like "
        "'params/conv1/kernel', or leave the pretrained path empty to train from scratch.")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ConfigError(f"Pretrained weights file {path!r} cannot be read ({e}); check its "
                      "permissions.") from e
  unreadable = (
      f"Pretrained weights file {path!r} is neither a flax msgpack variables file nor an .npz "
      "archive of arrays (%s). Write it with fednml_jax.models.save_variables, or with "
      "numpy.savez using keys like 'params/conv1/kernel'.")
  if data[:4] == b"PK\x03\x04":  # a zip archive: .npz
    try:
      with np.load(path, allow_pickle=False) as archive:
        flat = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ConfigError(unreadable % f"reading it as .npz failed: {e}") from e
  else:
    try:
      state = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on garbage.
      raise ConfigError(unreadable % f"reading it as msgpack failed: {e}") from e
    if not isinstance(state, dict):
      raise ConfigError(unreadable % f"it holds a {type(state).__name__}, not a dict")
    flat = flatten_variables(state)
  arrays = {}
  for key, value in flat.items():
    key = SEP.join(key) if isinstance(key, tuple) else str(key)
    if isinstance(value, (np.ndarray, np.generic, int, float)):
      arrays[key] = np.asarray(value)
  if not arrays:
    raise ConfigError(unreadable % "it contains no arrays")
  return arrays


def merge_pretrained(variables: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                     exclude: Sequence[str] = ()) -> tuple[dict[str, Any], LoadReport]:
  """`variables` with every leaf found in `arrays` (same path and shape) replaced.

  Loaded arrays take the dtype of the leaf they replace. Leaves whose path starts with one of
  `exclude` (e.g. "params/head") are kept as they are.
  """
  target = traverse_util.flatten_dict(dict(variables), keep_empty_nodes=True, sep=SEP)
  loaded, mismatch, missing, excluded = [], [], [], []
  for key, leaf in target.items():
    if leaf is traverse_util.empty_node:
      continue
    if any(key == p or key.startswith(p.rstrip(SEP) + SEP) for p in exclude):
      excluded.append(key)
    elif key not in arrays:
      missing.append(key)
    elif tuple(arrays[key].shape) != tuple(np.shape(leaf)):
      mismatch.append(key)
    else:
      target[key] = jnp.asarray(arrays[key], dtype=jnp.result_type(leaf))
      loaded.append(key)
  unused = tuple(sorted(set(arrays) - set(target)))
  report = LoadReport(tuple(loaded), tuple(mismatch), tuple(missing), unused, tuple(excluded))
  return traverse_util.unflatten_dict(target, sep=SEP), report


def load_pretrained(variables: Mapping[str, Any], path: str | os.PathLike,
                    exclude: Sequence[str] = ()) -> dict[str, Any]:
  """Initialises `variables` from the local weights file `path` (flax msgpack or `.npz`).

  Every leaf whose '/'-joined path (`params/conv1/kernel`, `batch_stats/bn1/mean`, ...) is in the
  file with the same shape is replaced; the others (e.g. a head for another number of labels, or
  anything under a prefix in `exclude`) keep their values. The counts are logged. Raises
  `ConfigError` when the file is missing, unreadable, or matches no leaf.
  """
  arrays = read_weights_file(path)
  merged, report = merge_pretrained(variables, arrays, exclude)
  if not report.loaded:
    model_keys = sorted(flatten_variables(dict(variables)))[:3]
    raise ConfigError(
        f"Pretrained weights file {os.fspath(path)!r} matches no variable of the model: "
        f"{report.summary()}. The file's keys look like {sorted(arrays)[:3]}, the model's like "
        f"{model_keys}; check that the file was saved from the same architecture (model.name) "
        "and uses '/'-joined keys starting with 'params/' or 'batch_stats/'.")
  logging.info("Pretrained weights from %s: %s.", os.fspath(path), report.summary())
  return merged
