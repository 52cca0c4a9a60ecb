r"""Seconds per federated round, JAX engine vs. a PyTorch round written as the reference's (issue #6).

  python benchmarks/round_time.py --preset=cpu|paper --out=FILE.json [--rounds=3]
      [--methods=fedavg,fednml] [--impls=jax,torch] [--clients=K] [--train_per_client=N]
      [--image_size=S] [--local_epochs=E] [--model_dtype=bfloat16] [--synthetic]

Presets (torch is the optional `bench` extra: `pip install -e .[bench]`):
- `cpu`: configs/rfmid64.py: SmallCNN width 16 at 64 px, 4 clients, 3 local epochs, batch 32, on the
  shared RFMiD file ../shared/data/rfmid_dev_64px.npz (`--synthetic`: random images of that size).
- `paper`: `fednml_jax.config.paper_setting`: ResNet-18 at 256 px, 4 clients × 440 training
  images, 3 local epochs, batch 32, AdamW 1e-4, on random uint8 images written at run time into a
  MedMNIST-layout .npz in a temporary folder (9 classes, val and test of n_train/8 images each).
`--clients`, `--train_per_client`, `--image_size` and `--local_epochs` shrink either preset (e.g.
for a quick check); `--train_per_client` on the cpu preset takes a random subset of the RFMiD
training split, keeping the classes the full split keeps.

What is timed, for each method and implementation, after one untimed first round (its excess over
a steady round is reported as `compile_seconds`: tracing and XLA compilation for JAX, CUDA/cuDNN
warm-up for torch), as the mean of `--rounds` rounds, the implementations' rounds alternating
(JAX, torch, torch, JAX, ...) so that a drift in the machine's speed falls on both:
- `fedavg`: a round of local training + aggregation, then evaluation on val and test;
- `fednml`, `round_kind=phase2`: a plain phase-2 round (LA+KD loss with a teacher forward);
- `fednml`, `round_kind=refinement`: the round `warmup_rounds`, whose label refinement (a pass of
  the global model over every client's training images, the transfer of the probabilities to the
  host, and the per-client GMM and label-table update on the host) runs before the same training.
  Measured after the phase-2 round, so its compile time is only the refinement pass's.
A round is split into `train_seconds`, `refine_device_seconds`, `refine_transfer_seconds`,
`refine_host_seconds` and `eval_seconds` (val + test forward and metrics);
`seconds_per_round` is their sum (the reference evaluates every round). The JAX side is the real
engine (`fednml_jax.train.Experiment.run_round` / `.evaluate`); its refinement is split by timing
`method.before_round` around a `predict_train` that blocks on the device result before pulling it
(the upload of the refined label table to the device is counted in `train_seconds`).
The torch side is `benchmarks/torch_reference.py` (sequential clients, a Python loop of optimizer
steps over a `DataLoader(shuffle=True, batch_size=32)` with CPU augmentation, state_dict
averaging), on the same images, clients, labels and number of optimizer steps, in this process.

`images_per_second` = training images per round (local epochs × Σ client sizes) / seconds per
round. Model FLOPs are counted from the model's jaxpr: 2 × multiply-adds of every convolution and
matrix product of one forward pass (padding positions included, element-wise work excluded), × 3
for a training step (forward + backward), × 1 for every forward (teacher, refinement pass,
evaluation), on real images only (not the padding of partial batches). XLA's own estimate for a
training step (`jit(...).lower(...).cost_analysis()`) is kept as `xla_train_flops_per_image` for
comparison (it skips multiply-adds on padding). `mfu` = model FLOPs per round / seconds per round
/ the device's measured matmul rate (a timed square `jnp.dot`: float32 on CPU; float32 with JAX's
default precision, and bfloat16, on GPU) for the model's compute dtype; `train_mfu` uses the
training part only.

Prints a table and the torch/JAX time ratios (of the means, and the median and range of the
ratios of rounds that ran next to each other); `--out` writes the rows as a JSON list. Timings are
only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import os

# JAX and torch share the accelerator in this process: keep JAX's pool to half of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
os.environ.setdefault("FEDNML_NO_PROGRESS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fednml_jax import config as config_lib  # noqa: E402
from fednml_jax import train  # noqa: E402
from fednml_jax.engine import local_training  # noqa: E402
from fednml_jax.models import small_cnn_widths  # noqa: E402

PRESETS = ("cpu", "paper")
METHODS = ("fedavg", "fednml")
IMPLS = ("jax", "torch")
SHARED_RFMID = os.path.join(REPO, "..", "shared", "data", "rfmid_dev_64px.npz")
SYNTHETIC_CLASSES = 9  # as many as RFMiD keeps at min_positives = 20
PARTS = ("train", "refine_device", "refine_transfer", "refine_host", "eval")


# Configurations -----------------------------------------------------------------------------------
def load_config_file(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_synthetic_npz(path, *, n_train, n_val, n_test, image_size, num_classes, seed=0):
  """A MedMNIST-layout .npz of random uint8 RGB images and random multi-hot labels."""
  rng = np.random.default_rng(seed)
  prevalence = rng.uniform(0.05, 0.3, num_classes)
  arrays = {}
  for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, image_size, image_size, 3), np.uint8)
    arrays[f"{split}_labels"] = (rng.random((n, num_classes)) < prevalence).astype(np.uint8)
  np.savez(path, **arrays)


def write_rfmid_subset(path, source, n_train, min_positives, seed=0):
  """`n_train` random training images of `source`, with the classes the full split keeps."""
  with np.load(source) as archive:
    data = {k: archive[k] for k in archive.files}
  keep = np.flatnonzero(data["train_labels"].sum(0) >= min_positives)
  if n_train > len(data["train_labels"]):
    raise SystemExit(f"--clients × --train_per_client = {n_train} exceeds the "
                     f"{len(data['train_labels'])} training images of {source}.")
  rows = np.sort(np.random.default_rng(seed).permutation(len(data["train_labels"]))[:n_train])
  out = {"train_images": data["train_images"][rows], "train_labels": data["train_labels"][rows],
         "label_names": data["label_names"]}
  for split in ("val", "test"):
    out[f"{split}_images"], out[f"{split}_labels"] = data[f"{split}_images"], data[f"{split}_labels"]
  for key in ("train_labels", "val_labels", "test_labels"):
    out[key] = out[key][:, keep]
  out["label_names"] = out["label_names"][keep]
  np.savez(path, **out)


def preset_config(args, tmpdir):
  """(config, data description) of `args.preset` with the size overrides applied."""
  if args.preset == "cpu":
    config = load_config_file(os.path.join(REPO, "configs", "rfmid64.py"))
    config.data.path = os.path.normpath(SHARED_RFMID)
    default_size, default_per_client = 64, None
  else:
    config = config_lib.paper_setting("npz", 4)
    config.labels.annotation_num = 7  # C − m with m = 2 missing classes per client
    default_size, default_per_client = 256, 440
  config.compare = ""
  if args.clients:
    config.fl.num_clients = args.clients
  if args.local_epochs:
    config.fl.local_epochs = args.local_epochs
  if args.batch_size:
    config.fl.batch_size = args.batch_size
  if args.strategy:
    config.fl.strategy = args.strategy
  if args.model_dtype:
    config.model.dtype = args.model_dtype
  clients = config.fl.num_clients
  synthetic = args.synthetic or args.preset == "paper"
  if not synthetic and args.image_size and args.image_size != default_size:
    raise SystemExit("--image_size needs synthetic data (--synthetic): the RFMiD file is 64 px.")
  if synthetic:
    size = args.image_size or default_size
    per_client = args.train_per_client or default_per_client or 949 // clients
    n_train = clients * per_client
    n_eval = max(32, n_train // 8)
    path = os.path.join(tmpdir, f"synthetic_{size}px.npz")
    write_synthetic_npz(path, n_train=n_train, n_val=n_eval, n_test=n_eval, image_size=size,
                        num_classes=SYNTHETIC_CLASSES)
    config.data.source, config.data.path, config.data.min_positives = "npz", path, 0
    data = f"synthetic random uint8 {size}px ({n_train} train, {n_eval} val, {n_eval} test)"
  else:
    if not os.path.isfile(config.data.path):
      raise SystemExit(f"The cpu preset reads {config.data.path}, which is absent; use "
                       "--synthetic for random images of the same size.")
    data = os.path.basename(config.data.path)
    if args.train_per_client:
      path = os.path.join(tmpdir, "rfmid_subset.npz")
      write_rfmid_subset(path, config.data.path, clients * args.train_per_client,
                         config.data.min_positives)
      config.data.path, config.data.min_positives = path, 0
      data += f" (random {clients * args.train_per_client}-image training subset)"
  config_lib.validate(config)
  return config, data


# FLOPs and the device's matmul rate --------------------------------------------------------------
def _sub_jaxprs(params):
  for value in params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def jaxpr_flops(jaxpr) -> float:
  """2 × multiply-adds of the convolutions and matrix products in `jaxpr` (recursively)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    else:
      repeat = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in _sub_jaxprs(eqn.params):
        total += repeat * jaxpr_flops(sub)
  return total


def model_flops(model, variables, image_shape, batch_size) -> dict:
  """Forward and training-step model FLOPs per image, and XLA's estimate of a training step."""
  x = jnp.zeros((batch_size,) + tuple(image_shape), jnp.float32)
  forward = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  fwd = jaxpr_flops(forward.jaxpr) / batch_size

  def loss(params, batch_stats, x):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    return jnp.mean(logits.astype(jnp.float32)), updates

  xla = None
  try:
    lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(
        variables["params"], variables["batch_stats"], x)
    cost = lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    if cost and cost.get("flops"):
      xla = float(cost["flops"]) / batch_size
  except Exception:  # pylint: disable=broad-except  # only a cross-check
    xla = None
  return {"forward": fwd, "train": 3.0 * fwd, "xla_train": xla}


def matmul_rate(size: int, dtype, min_seconds: float) -> float:
  """FLOP/s of a jitted square `jnp.dot` of `size` in `dtype` (JAX's default precision)."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(keys[0], (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(keys[1], (size, size), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  reps, elapsed = 0, 0.0
  start = time.perf_counter()
  while reps < 3 or elapsed < min_seconds:
    jax.block_until_ready(dot(a, b))
    reps += 1
    elapsed = time.perf_counter() - start
  return 2.0 * size ** 3 * reps / elapsed


def device_rates(args) -> dict:
  gpu = jax.default_backend() != "cpu"
  size = args.matmul_size or (8192 if gpu else 2048)
  rates = {"float32": matmul_rate(size, jnp.float32, args.matmul_seconds)}
  if gpu:
    rates["bfloat16"] = matmul_rate(size, jnp.bfloat16, args.matmul_seconds)
  return {"matmul_size": size, "matmul_flops_per_second": rates}


# Timing --------------------------------------------------------------------------------------------
def _steady(rounds: list[dict]) -> dict:
  """Mean seconds per part over the timed rounds."""
  return {part: float(np.mean([r.get(part, 0.0) for r in rounds])) for part in PARTS}


class JaxRunner:
  """The engine's round with its refinement split into device pass, host transfer and host work."""

  def __init__(self, config):
    self.experiment = exp = train.Experiment(config)
    self.parts: dict[str, float] = {}
    method = exp.method
    before_round = method.before_round

    def timed_before_round(ctx, state):
      start = time.perf_counter()
      out = before_round(ctx, state)
      self._add("refine", time.perf_counter() - start)
      return out

    def timed_predict_train(variables, rnd, with_features=False):
      # Experiment.predict_train, with the device result awaited before the transfer.
      key = jax.random.fold_in(jax.random.fold_in(exp.run_key, train.STREAM_REFINE), rnd)
      start = time.perf_counter()
      probs = jax.block_until_ready(exp._predict_clients[with_features](  # pylint: disable=protected-access
          variables, exp.train_images, exp._device_image_index, key))  # pylint: disable=protected-access
      mid = time.perf_counter()
      host = jax.tree.map(np.asarray, probs)
      self._add("refine_device", mid - start)
      self._add("refine_transfer", time.perf_counter() - mid)
      return host

    method.before_round = timed_before_round
    exp.predict_train = timed_predict_train
    self.variables = exp.initial_variables()
    self.state = method.init_state()

  def _add(self, key, seconds):
    self.parts[key] = self.parts.get(key, 0.0) + seconds

  def round(self, rnd: int) -> dict:
    exp = self.experiment
    self.parts = {}
    start = time.perf_counter()
    self.variables, self.state, _ = exp.run_round(rnd, self.variables, self.state)
    jax.block_until_ready(self.variables)
    total = time.perf_counter() - start
    start = time.perf_counter()
    exp.evaluate(self.variables)
    evaluation = time.perf_counter() - start
    refine = self.parts.get("refine", 0.0)
    device, transfer = self.parts.get("refine_device", 0.0), self.parts.get("refine_transfer", 0.0)
    return {"train": total - refine, "refine_device": device, "refine_transfer": transfer,
            "refine_host": max(refine - device - transfer, 0.0), "eval": evaluation}


class TorchRunner:
  """`torch_reference.TorchFederation` on the experiment's images, clients and labels."""

  def __init__(self, experiment, method: str, args):
    import torch_reference  # pylint: disable=import-outside-toplevel
    config, setup, layout = experiment.config, experiment.setup, experiment.layout
    self.experiment, self.method = experiment, method
    clients = [layout.sample_index[k][layout.valid[k]] for k in range(layout.num_real_clients)]
    fednml = config.fednml
    self.federation = torch_reference.TorchFederation(
        model_name=config.model.name, norm=config.model.norm,
        num_outputs=experiment.model.num_outputs, widths=small_cnn_widths(config.model.width),
        train_images=np.asarray(experiment.dataset.train.images),
        observed_labels=setup.observed_labels,
        client_indices=clients, annotated=setup.annotated[:layout.num_real_clients],
        mean=np.asarray(experiment.image_mean), std=np.asarray(experiment.image_std),
        augment=config.augment.to_dict(), batch_size=config.fl.batch_size,
        local_epochs=config.fl.local_epochs, lr=config.optim.lr,
        weight_decay=config.optim.weight_decay, device=args.torch_device,
        num_workers=args.torch_workers, seed=config.seed, warmup_rounds=fednml.warmup_rounds,
        refine_every=fednml.refine_every, hard_high=fednml.hard_high, hard_low=fednml.hard_low,
        missing_momentum=fednml.missing_momentum, tau=fednml.tau)
    dataset = experiment.dataset
    self.eval_images = {"val": np.asarray(dataset.val.images),
                        "test": np.asarray(dataset.test.images)}
    self.eval_labels = {"val": dataset.val.labels, "test": dataset.test.labels}

  def round(self, rnd: int) -> dict:
    exp = self.experiment
    w_kd = exp.method.kd_weight(rnd) if self.method == "fednml" else 0.0
    _, parts = self.federation.run_round(rnd, self.method, w_kd)
    start = time.perf_counter()
    self.federation.evaluate(self.eval_images,
                             lambda name, p: exp.task.evaluate(p, self.eval_labels[name]))
    out = {part: parts.get(part, 0.0) for part in PARTS}
    out["eval"] = time.perf_counter() - start
    for key in ("data", "train_data", "refine_data"):
      out[key] = parts.get(key, 0.0)
    return out


def time_interleaved(runners: dict, rnd: int, rounds: int) -> dict:
  """{impl: (seconds of a first (compiling) round, parts of `rounds` timed rounds)}.

  The implementations' timed rounds alternate (and so does which one goes first in each pair),
  so that a change in the machine's speed during the measurement falls on all of them alike and
  the per-pair time ratios can be compared.
  """
  impls = list(runners)
  first, timed = {}, {impl: [] for impl in impls}
  for impl in impls:
    first[impl] = sum(runners[impl].round(rnd)[p] for p in PARTS)
    print(f"  {impl} first round: {first[impl]:.2f} s", flush=True)
  for i in range(rounds):
    for impl in (impls if i % 2 == 0 else impls[::-1]):
      timed[impl].append(runners[impl].round(rnd))
      print(f"  {impl} round {i + 1}: " + ", ".join(
          f"{p} {v:.2f}" for p, v in timed[impl][-1].items() if v) + " s", flush=True)
  return {impl: (first[impl], timed[impl]) for impl in impls}


def optimizer_steps(config, client_sizes) -> int:
  """Optimizer steps of one round: local epochs × ceil(size / batch) for every client."""
  return sum(config.fl.local_epochs * local_training.steps_per_epoch(int(n), config.fl.batch_size)
             for n in client_sizes)


def round_kinds(method: str, config) -> list[tuple[str, int]]:
  """(round_kind, round number) to time for `method`, in order."""
  if method == "fedavg":
    return [("train", 1)]
  warmup = config.fednml.warmup_rounds
  kinds = [("refinement", warmup)]
  if config.fednml.refine_every > 1:  # else every phase-2 round refines
    kinds.insert(0, ("phase2", warmup + 1))
  return kinds


def flops_per_round(kind: str, method: str, flops: dict, train_images: int, client_images: int,
                    eval_images: int) -> dict:
  training = train_images * flops["train"]
  if method == "fednml" and kind != "warmup":
    training += train_images * flops["forward"]  # the frozen teacher's forward pass
  refine = client_images * flops["forward"] if kind == "refinement" else 0.0
  return {"train": training, "refine": refine, "eval": eval_images * flops["forward"]}


def make_row(*, preset, method, kind, impl, experiment, data, first_total, timed, flops,
             rates, extra) -> dict:
  config, layout = experiment.config, experiment.layout
  steady = _steady(timed)
  per_round = sum(steady.values())
  counts = layout.counts[:layout.num_real_clients]
  client_images = int(counts.sum())
  train_images = config.fl.local_epochs * client_images
  n_eval = len(experiment.dataset.val) + len(experiment.dataset.test)
  work = flops_per_round(kind, method, flops, train_images, client_images, n_eval)
  peak_dtype = "bfloat16" if config.model.dtype == "bfloat16" else "float32"
  peak = rates["matmul_flops_per_second"].get(peak_dtype)
  total_flops = sum(work.values())
  steps = optimizer_steps(config, counts)
  row = {
      "preset": preset, "method": method, "round_kind": kind, "impl": impl,
      "seconds_per_round": per_round,
      "images_per_second": train_images / per_round if per_round > 0 else None,
      "compile_seconds": max(first_total - per_round, 0.0),
      "first_round_seconds": first_total,
      **{f"{part}_seconds": steady[part] for part in PARTS},
      "refine_seconds": steady["refine_device"] + steady["refine_transfer"]
                        + steady["refine_host"],
      "train_images_per_second": train_images / steady["train"] if steady["train"] > 0 else None,
      "model_flops_per_round": total_flops,
      "model_flops_per_round_parts": work,
      "train_flops_per_image": flops["train"], "forward_flops_per_image": flops["forward"],
      "xla_train_flops_per_image": flops["xla_train"],
      "peak_matmul_flops_per_second": peak, "peak_dtype": peak_dtype,
      "mfu": total_flops / per_round / peak if per_round > 0 and peak else None,
      "train_mfu": work["train"] / steady["train"] / peak if steady["train"] > 0 and peak else None,
      "round_seconds": [sum(r[p] for p in PARTS) for r in timed],
      "timed_rounds": len(timed),
      "optimizer_steps": steps, "images_per_round": train_images,
      "clients": int(layout.num_real_clients), "client_sizes": counts.tolist(),
      "val_images": len(experiment.dataset.val), "test_images": len(experiment.dataset.test),
      "num_classes": experiment.dataset.num_classes,
      "image_size": int(experiment.dataset.image_shape[0]), "local_epochs": config.fl.local_epochs,
      "batch_size": config.fl.batch_size, "model": config.model.name,
      "model_width": config.model.width if config.model.name == "small_cnn" else None,
      "model_dtype": config.model.dtype, "data": data,
      "matmul_flops_per_second": rates["matmul_flops_per_second"],
      "host": platform.node(), "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__, "jax_backend": jax.default_backend(),
      "jax_device": str(jax.devices()[0].device_kind),
      **extra,
  }
  return row


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_preset(args) -> list[dict]:
  rows = []
  rates = device_rates(args)
  print(f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        "matmul rate: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s"
                                    for k, v in rates["matmul_flops_per_second"].items()),
        flush=True)
  with tempfile.TemporaryDirectory(prefix="fednml_bench_") as tmpdir:
    base, data = preset_config(args, tmpdir)
    flops = None
    for method in args.methods:
      config = base.copy_and_resolve_references()
      config.method = method
      jax_runner = JaxRunner(config)
      experiment = jax_runner.experiment
      if flops is None:
        flops = model_flops(experiment.model, jax_runner.variables, experiment.dataset.image_shape,
                            config.fl.batch_size)
      kinds = round_kinds(method, config)
      runners, extras = {}, {}
      for impl in args.impls:
        if impl == "jax":
          runners[impl], extras[impl] = jax_runner, {"strategy": experiment.strategy}
        else:
          import torch  # pylint: disable=import-outside-toplevel
          runners[impl] = runner = TorchRunner(experiment, method, args)
          fed = runner.federation
          extras[impl] = {"torch_version": torch.__version__, "torch_device": str(fed.device),
                          "torch_threads": torch.get_num_threads(),
                          "torch_workers": args.torch_workers,
                          "torch_device_name": (torch.cuda.get_device_name(fed.device)
                                                if fed.device.type == "cuda" else _cpu_name())}
          if fed.optimizer_steps() != optimizer_steps(config, experiment.layout.counts):
            raise RuntimeError("the torch baseline takes a different number of steps")
      for kind, rnd in kinds:
        print(f"[{args.preset}] {method} {kind} {'/'.join(runners)}: a first round each, then "
              f"{args.rounds} timed each, alternating ...", flush=True)
        for impl, (first_total, timed) in time_interleaved(runners, rnd, args.rounds).items():
          row_extra = dict(extras[impl])
          if impl == "torch":  # time spent in the DataLoader (CPU augmentation), by part
            for key in ("data", "train_data", "refine_data"):
              row_extra[f"{key}_seconds"] = float(np.mean([r[key] for r in timed]))
          rows.append(make_row(preset=args.preset, method=method, kind=kind, impl=impl,
                               experiment=experiment, data=data, first_total=first_total,
                               timed=timed, flops=flops, rates=rates, extra=row_extra))
      del runners
      del jax_runner, experiment
  return rows


# Output ----------------------------------------------------------------------------------------------
def _fmt(value, spec):
  """`value` formatted by `spec` ("9.1f", "8.2%"), or "n/a" in the same width."""
  return format(value, spec) if value is not None else format("n/a", f">{spec.split('.')[0]}")


def paired_ratios(torch_row: dict, jax_row: dict) -> list[float]:
  """torch / JAX seconds of the i-th timed rounds, which ran next to each other."""
  return [t / j for t, j in zip(torch_row["round_seconds"], jax_row["round_seconds"]) if j > 0]


def format_tables(rows: list[dict]) -> str:
  header = (f"{'preset':7s}{'method':8s}{'round':11s}{'impl':6s}{'s/round':>9s}{'img/s':>9s}"
            f"{'compile':>9s}{'train':>9s}{'ref.dev':>9s}{'ref.xfer':>9s}{'ref.host':>9s}"
            f"{'eval':>8s}{'MFU':>8s}{'trainMFU':>9s}")
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(
        f"{r['preset']:7s}{r['method']:8s}{r['round_kind']:11s}{r['impl']:6s}"
        f"{r['seconds_per_round']:9.3f}{_fmt(r['images_per_second'], '9.1f')}"
        f"{r['compile_seconds']:9.2f}{r['train_seconds']:9.3f}{r['refine_device_seconds']:9.3f}"
        f"{r['refine_transfer_seconds']:9.4f}{r['refine_host_seconds']:9.3f}"
        f"{r['eval_seconds']:8.3f}{_fmt(r['mfu'], '8.2%')}{_fmt(r['train_mfu'], '9.2%')}")
  ratios = []
  by_key = {(r["preset"], r["method"], r["round_kind"], r["impl"]): r for r in rows}
  for (preset, method, kind, impl), jax_row in by_key.items():
    torch_row = by_key.get((preset, method, kind, "torch"))
    if impl != "jax" or torch_row is None:
      continue
    ratio = lambda key: (torch_row[key] / jax_row[key]  # noqa: E731
                         if jax_row[key] > 0 else float("nan"))
    refine = (f"{ratio('refine_seconds'):9.2f}" if kind == "refinement" else f"{'':9s}")
    paired = paired_ratios(torch_row, jax_row)
    ratios.append(f"{preset:7s}{method:8s}{kind:11s}{ratio('seconds_per_round'):9.2f}"
                  f"{ratio('train_seconds'):9.2f}{refine}{ratio('eval_seconds'):9.2f}"
                  f"   {np.median(paired):.2f} [{min(paired):.2f}, {max(paired):.2f}]")
  if ratios:
    head = (f"{'preset':7s}{'method':8s}{'round':11s}{'round':>9s}{'train':>9s}{'refine':>9s}"
            f"{'eval':>9s}   round, paired: median [min, max]")
    lines += ["", "torch seconds / JAX seconds (> 1: JAX is faster)", head, "-" * len(head), *ratios]
  return "\n".join(lines)


def positive_ints(parser, text: str, flag: str) -> list[int]:
  """The comma-separated positive integers of `--flag` (repeats allowed), or a usage error."""
  try:
    values = [int(v) for v in text.split(",") if v]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    parser.error(f"--{flag} must be a comma-separated list of positive integers")
  return values


def add_preset_size_args(parser) -> None:
  """The flags `preset_config` reads besides `--preset` (shared by the benchmark scripts)."""
  for flag in ("clients", "train_per_client", "image_size", "local_epochs", "batch_size"):
    parser.add_argument(f"--{flag}", type=int)
  parser.add_argument("--strategy", choices=("auto", "vmap", "shard", "loop"),
                      help="fl.strategy of the JAX engine (default: the preset's, auto)")
  parser.add_argument("--model_dtype", choices=("float32", "bfloat16"),
                      help="model.dtype of the JAX engine (default: the preset's, float32); "
                           "the torch round stays float32")
  parser.add_argument("--synthetic", action="store_true",
                      help="cpu preset: random images instead of the shared RFMiD file")


def run_and_write(parse_args, run, argv=None):
  """A benchmark script's `main`: parse `argv`, `run(args)`, write its rows to `--out`, return
  them."""
  args = parse_args(argv)
  rows = run(args)
  write_rows(rows, args.out)
  return rows


def write_rows(rows, path) -> None:
  """The benchmark's rows as JSON at `path` (nothing when `path` is empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(rows, f, indent=2)
    print(f"wrote {len(rows) if isinstance(rows, list) else 1} row(s) to {path}")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=PRESETS, required=True)
  parser.add_argument("--out", help="write the rows as a JSON list to this file")
  parser.add_argument("--rounds", type=int, default=3, help="timed rounds per round kind")
  parser.add_argument("--methods", default="fedavg,fednml")
  parser.add_argument("--impls", default="jax,torch")
  add_preset_size_args(parser)
  parser.add_argument("--torch_device", help="default: cuda when available, else cpu")
  parser.add_argument("--torch_workers", type=int, default=0,
                      help="DataLoader workers (the reference uses 0)")
  parser.add_argument("--matmul_size", type=int, help="default: 2048 on CPU, 8192 on GPU")
  parser.add_argument("--matmul_seconds", type=float, default=1.0)
  args = parser.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  args.impls = [i for i in args.impls.split(",") if i]
  for name, values, valid in (("methods", args.methods, METHODS), ("impls", args.impls, IMPLS)):
    bad = [v for v in values if v not in valid]
    if bad or not values:
      parser.error(f"--{name} must be a comma-separated subset of {','.join(valid)}")
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if "torch" in args.impls and importlib.util.find_spec("torch") is None:
    raise SystemExit("torch is not installed: `pip install -e .[bench]`, or --impls=jax.")
  sys.path.insert(0, HERE)  # torch_reference
  rows = run_preset(args)
  print(format_tables(rows))
  write_rows(rows, args.out)
  return rows


if __name__ == "__main__":
  main()
