"""The config schema: every key a run understands, its default, and validation.

Config files in `configs/` start from `base_config()` and change values; they cannot add keys.
`validate(config)` checks the keys against this schema and the values' ranges, and raises a
`ConfigError` that names the offending key (unknown keys get the closest valid names suggested).
Checks that need the data (e.g. `annotation_num` ≤ number of classes) happen in `train.py`.
"""

from __future__ import annotations

import difflib
import json

import ml_collections
from ml_collections import config_dict

from fednml_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "fedavg"
  c.compare = ""  # e.g. "fedavg,fednml": run each method in workdir/<method>/, print one table
  c.task = "multilabel"  # multilabel (sigmoid per class) | singlelabel (softmax; README)
  c.seed = 0
  c.rounds = 100

  c.data = ml_collections.ConfigDict()
  # embedded (multi-label digit mosaics) | embedded_digits (one digit per image, for
  # task = singlelabel) | npz | mured | rfmid | brset
  c.data.source = "embedded"
  c.data.path = ""  # file (npz) or folder (mured/rfmid/brset)
  c.data.image_size = 256  # resize target of the CSV + image-folder sources
  c.data.cache_dir = ""  # where prepared caches go; default: inside data.path
  c.data.min_positives = 20  # classes with fewer training positives are dropped (paper)
  c.data.val_fraction = 0.1  # carved from train when a source has no validation split
  c.data.embedded_train = 1200
  c.data.embedded_val = 300
  c.data.embedded_test = 600

  c.labels = ml_collections.ConfigDict()
  c.labels.noise_rate = 0.0  # fraction of each client's samples whose labels are corrupted
  # None = the task's default. multilabel: multilabel_instance (ALGORITHMS.md §1, the only one);
  # singlelabel: symmetric (default; to another class) | pair (c -> c+1) | instance (Xia et al.)
  c.labels.noise_type = config_dict.placeholder(str)
  # singlelabel only, FedCorr's heterogeneous noise: each client is noisy with this probability,
  # at a rate drawn from U(min_client_noise, 1); the others are clean. None = noise_rate for all.
  c.labels.noisy_client_fraction = config_dict.placeholder(float)
  c.labels.min_client_noise = 0.5
  c.labels.annotation_num = config_dict.placeholder(int)  # classes each client annotates; None = all
  c.labels.partition = "iid"  # iid | dirichlet
  c.labels.dirichlet_alpha = 1.0

  c.fl = ml_collections.ConfigDict()
  c.fl.num_clients = 4
  c.fl.local_epochs = 3
  c.fl.batch_size = 32
  c.fl.strategy = "auto"  # auto | vmap | shard | loop
  c.fl.client_weighting = "sample_count"  # sample_count | uniform (aggregation weights)
  c.fl.scan_unroll = 0  # local steps unrolled in the scan; 0 = auto (all on CPU, 1 elsewhere)
  # Training images on the device: `shared` (the whole set on every device, indexed by the
  # clients), `per_client` (each client's images as a block, split over the devices like the
  # clients), `auto` (per_client in a multi-host run, else shared). The same results either way.
  c.fl.image_layout = "auto"

  # Server rule (fednml_jax/aggregation.py): mean (weighted by fl.client_weighting) |
  # geometric_median | coordinate_median | trimmed_mean | krum
  c.aggregation = "mean"
  c.aggregation_options = ml_collections.ConfigDict()
  c.aggregation_options.trim_fraction = 0.1  # trimmed_mean: drop floor(f·K) largest and smallest
  c.aggregation_options.num_byzantine = 1  # krum: f, the number of clients it tolerates
  c.aggregation_options.geometric_median_iters = 10  # geometric_median: Weiszfeld iterations

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-4  # AdamW, re-initialised every round as in the reference

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet18"  # small_cnn | resnet18 | resnet50
  c.model.norm = "batch"  # batch | group
  c.model.width = 32  # small_cnn only
  c.model.dtype = "float32"  # float32 | bfloat16 (compute dtype; parameters stay float32)
  c.model.pretrained = ""  # local weights file (flax msgpack or npz); nothing is downloaded

  c.augment = ml_collections.ConfigDict()
  c.augment.rotation_degrees = 10.0
  c.augment.translate = 0.02
  c.augment.hflip = True

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1  # evaluate val and test every this many rounds (and at the last round)
  c.eval.batch_size = 256
  c.eval.select_on = "val"  # val | test ("test" reproduces the reference's best-on-test; not honest)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # save every this many rounds, and after the last round
  c.checkpoint.keep = 2  # keep the newest this many checkpoints
  c.resume = "auto"  # auto | require | fresh | force (see README: Resuming)
  c.plots = False  # diagnostic PNGs in <workdir>/plots/ (FedNML's GMM fits); needs matplotlib

  # Each method's own constants live under config.<method name>, defined in its module.
  from fednml_jax.methods import method_config_defaults
  for name, defaults in method_config_defaults().items():
    c[name] = defaults
  return c


def paper_setting(source: str, num_clients: int) -> ml_collections.ConfigDict:
  """FedNML's paper protocol on a published dataset under `data/<source>`: FedNML, 100 rounds,
  3 local epochs, batch 32, AdamW (lr 1e-4, weight decay 1e-4) re-initialised every round,
  ResNet-18 at 256 px, 20% noise; `labels.annotation_num` is left for the user (C − m)."""
  c = base_config()
  c.method = "fednml"
  c.rounds = 100
  c.data.source = source
  c.data.path = f"data/{source}"
  c.data.image_size = 256
  c.labels.noise_rate = 0.2
  c.fl.num_clients = num_clients
  c.fl.local_epochs = 3
  c.fl.batch_size = 32
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.model.name = "resnet18"
  c.eval.every = 1
  return c


def cpu_setting(path: str, annotation_num: int) -> ml_collections.ConfigDict:
  """The paper's protocol on a shared 64-px npz file, sized for a 2-core CPU: 4 IID clients, 3
  local epochs, batch 32, AdamW re-initialised every round, 20% noise, a SmallCNN (width 16)
  trained from scratch (lr 1e-3 instead of the paper's 1e-4 for a pretrained ResNet-18),
  30 rounds, evaluation every 2 rounds."""
  c = base_config()
  c.method = "fedavg"
  c.rounds = 30
  c.data.source = "npz"
  c.data.path = path
  c.labels.noise_rate = 0.2
  c.labels.annotation_num = annotation_num
  c.fl.num_clients = 4
  c.fl.local_epochs = 3
  c.fl.batch_size = 32
  c.optim.lr = 1e-3
  c.model.name = "small_cnn"
  c.model.width = 16
  c.eval.every = 2
  return c


VALID_CHOICES = {
    "task": ("multilabel", "singlelabel"),
    "data.source": ("embedded", "embedded_digits", "npz", "mured", "rfmid", "brset"),
    "labels.partition": ("iid", "dirichlet"),
    "fl.strategy": ("auto", "vmap", "shard", "loop"),
    "fl.client_weighting": ("sample_count", "uniform"),
    "fl.image_layout": ("auto", "shared", "per_client"),
    # = tuple(aggregation.AGGREGATORS) (kept literal so the schema imports no JAX; a test checks it)
    "aggregation": ("mean", "geometric_median", "coordinate_median", "trimmed_mean", "krum"),
    "model.name": ("small_cnn", "resnet18", "resnet50"),
    "model.norm": ("batch", "group"),
    "model.dtype": ("float32", "bfloat16"),
    "eval.select_on": ("val", "test"),
    "resume": ("auto", "require", "fresh", "force"),
}


def noise_type(cfg) -> str:
  """`labels.noise_type`, or the task's default when it is None."""
  from fednml_jax.corruption import NOISE_TYPES
  return cfg.labels.noise_type or NOISE_TYPES[cfg.task][0]


def _flatten(cfg, prefix=""):
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def flatten(cfg) -> dict:
  """{'fl.num_clients': 4, ...}: the config as dotted keys."""
  return _flatten(cfg)


def validate(cfg) -> None:
  """Raises ConfigError for unknown keys, unknown choices and out-of-range values."""
  from fednml_jax.methods import METHODS
  schema = flatten(base_config())
  given = flatten(cfg)
  unknown = sorted(set(given) - set(schema))
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, schema, n=1)
      hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"Unknown config key(s): {', '.join(hints)}. Valid keys are listed in "
                      "fednml_jax/config.py and in each method's module.")
  for method in [cfg.method] + [m for m in cfg.compare.split(",") if m]:
    if method not in METHODS:
      raise ConfigError(f"Unknown method {method!r}; --config.method (and each name in "
                        f"--config.compare) must be one of {sorted(METHODS)}.")
  for key, choices in VALID_CHOICES.items():
    if given.get(key) not in choices:
      raise ConfigError(f"config.{key} = {given.get(key)!r} is not one of {list(choices)}.")
  _validate_task(cfg, METHODS)
  checks = [
      ("rounds", cfg.rounds >= 1, "at least 1"),
      ("labels.noise_rate", 0.0 <= cfg.labels.noise_rate < 1.0, "in [0, 1)"),
      ("labels.dirichlet_alpha", cfg.labels.dirichlet_alpha > 0, "positive"),
      ("fl.num_clients", cfg.fl.num_clients >= 1, "at least 1"),
      ("fl.local_epochs", cfg.fl.local_epochs >= 1, "at least 1"),
      ("fl.batch_size", cfg.fl.batch_size >= 1, "at least 1"),
      ("fl.scan_unroll", cfg.fl.scan_unroll >= 0, "0 (auto) or a positive number of steps"),
      ("optim.lr", cfg.optim.lr > 0, "positive"),
      ("optim.weight_decay", cfg.optim.weight_decay >= 0, "non-negative"),
      ("data.min_positives", cfg.data.min_positives >= 0, "non-negative"),
      ("data.val_fraction", 0.0 < cfg.data.val_fraction < 1.0, "in (0, 1)"),
      ("data.image_size", cfg.data.image_size >= 8, "at least 8"),
      ("eval.every", cfg.eval.every >= 1, "at least 1"),
      ("eval.batch_size", cfg.eval.batch_size >= 1, "at least 1"),
      ("checkpoint.every", cfg.checkpoint.every >= 1, "at least 1"),
      ("checkpoint.keep", cfg.checkpoint.keep >= 1, "at least 1"),
      ("aggregation_options.trim_fraction",
       0.0 <= cfg.aggregation_options.trim_fraction < 0.5, "in [0, 0.5)"),
      ("aggregation_options.num_byzantine", cfg.aggregation_options.num_byzantine >= 0,
       "non-negative"),
      ("aggregation_options.geometric_median_iters",
       cfg.aggregation_options.geometric_median_iters >= 1, "at least 1"),
  ]
  for key, ok, what in checks:
    if not ok:
      raise ConfigError(f"config.{key} = {given[key]!r} must be {what}.")
  if cfg.plots:
    from fednml_jax.plots import require_matplotlib  # noqa: PLC0415
    require_matplotlib()
  krum_min_clients = cfg.aggregation_options.num_byzantine + 3
  if cfg.aggregation == "krum" and cfg.fl.num_clients < krum_min_clients:
    raise ConfigError(f"config.aggregation = 'krum' scores each client by its "
                      f"num_clients − num_byzantine − 2 nearest others, so it needs "
                      f"config.fl.num_clients ≥ {krum_min_clients} (num_byzantine = "
                      f"{cfg.aggregation_options.num_byzantine}); got {cfg.fl.num_clients}.")
  annotation_num = cfg.labels.annotation_num
  if annotation_num is not None and annotation_num < 1:
    raise ConfigError(f"config.labels.annotation_num = {annotation_num} must be at least 1 (or "
                      "None for all classes).")
  if cfg.data.source in ("npz", "mured", "rfmid", "brset") and not cfg.data.path:
    raise ConfigError(f"config.data.source = {cfg.data.source!r} needs config.data.path (the "
                      "file or folder holding the data).")


def _validate_task(cfg, methods) -> None:
  """The methods, noise type and data source must fit `config.task`."""
  from fednml_jax.corruption import NOISE_TYPES
  task = cfg.task
  supported = lambda cls: tuple(cls.supported_tasks)  # noqa: E731
  for method in [cfg.method] + [m for m in cfg.compare.split(",") if m]:
    if task not in supported(methods[method]):
      supporting = sorted(name for name, cls in methods.items() if task in supported(cls))
      raise ConfigError(f"Method {method!r} does not support config.task = {task!r} (its losses "
                        f"are written for {list(supported(methods[method]))}); the methods that "
                        f"support {task!r} are {supporting}.")
  kind = noise_type(cfg)
  if kind not in NOISE_TYPES[task]:
    owner = next((t for t, kinds in NOISE_TYPES.items() if kind in kinds), None)
    what = f"a {owner} noise type" if owner else "not a noise type"
    raise ConfigError(f"config.labels.noise_type = {kind!r} is {what}; with config.task = "
                      f"{task!r} it must be one of {list(NOISE_TYPES[task])} (or None for "
                      f"{NOISE_TYPES[task][0]!r}).")
  fraction = cfg.labels.noisy_client_fraction
  if fraction is not None:
    if task != "singlelabel":
      raise ConfigError("config.labels.noisy_client_fraction (heterogeneous client noise rates) "
                        "needs config.task = 'singlelabel'; the multi-label noise uses "
                        "labels.noise_rate on every client. Set it to None.")
    if not 0.0 <= fraction <= 1.0:
      raise ConfigError(f"config.labels.noisy_client_fraction = {fraction!r} must be in [0, 1] "
                        "(the probability that a client is noisy).")
    if cfg.labels.noise_rate != 0.0:
      raise ConfigError(f"config.labels.noise_rate = {cfg.labels.noise_rate} and "
                        f"config.labels.noisy_client_fraction = {fraction} both set the client "
                        "noise rates: set noise_rate = 0 to draw heterogeneous rates "
                        "(U(min_client_noise, 1) on noisy clients), or "
                        "noisy_client_fraction = None for one fixed rate.")
  if not 0.0 <= cfg.labels.min_client_noise < 1.0:
    raise ConfigError(f"config.labels.min_client_noise = {cfg.labels.min_client_noise!r} must be "
                      "in [0, 1).")
  if task == "singlelabel" and cfg.data.source == "embedded":
    raise ConfigError("config.data.source = 'embedded' is the multi-label digit mosaics; with "
                      "config.task = 'singlelabel' use config.data.source = 'embedded_digits' "
                      "(one digit per image).")


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A workdir's config.json as a config of the current schema: keys added since take their
  defaults, keys the schema no longer has are dropped (the rule resuming uses too)."""
  cfg = base_config()
  known = flatten(cfg)
  for key, value in flatten(saved).items():
    if key in known:
      node = cfg
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return cfg


def to_json(cfg) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
