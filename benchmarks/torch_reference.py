r"""A PyTorch round of FedAvg / FedNML written the way the reference implementation runs it.

Used by `benchmarks/round_time.py` as the baseline the JAX engine is timed against. It is a timing
baseline, not a second implementation of the method to get results from: the numbers it computes
(losses, refined labels) are plausible but are not checked against the JAX engine.

The reference (Hmxki/FedNML, `src/train_FedNML.py` and `src/update_ours_all.py`) trains the
clients one after another. Per client and round it
- copies the global model, re-creates `AdamW(lr, weight_decay=1e-4)`;
- iterates a `DataLoader(client subset, batch_size=32, shuffle=True)` (no workers, no
  `drop_last`) whose `Dataset` augments every image on the CPU (`RandomAffine(degrees=10,
  translate=(0.02, 0.02))` + `RandomHorizontalFlip()`, then normalisation), for `local_ep` epochs,
  one Python-level optimizer step per batch, reading `loss.item()` after every step;
- warm-up / FedAvg: `BCEWithLogits(reduction='none')[:, annotated classes].mean()`;
- FedNML phase 2: the logit-adjusted loss `w·BCE(σ(z'), σ(teacher(x))) + (1 − w)·BCEWithLogits(z',
  Ŷ)` with a frozen copy of the global model as the teacher, forwarded on every batch;
- FedNML refinement (every `refine_every` rounds from `warmup`): a pass of the global model in
  eval mode over the client's (shuffled, augmented) DataLoader, moving each batch's probabilities to
  the host, then per-sample consistency and BCE, a 2-component `sklearn` GaussianMixture, and
  per-sample Python loops that rewrite the client's label table and class counts;
then the server averages the clients' `state_dict`s (uniform mean, BatchNorm buffers included)
and evaluates with a `DataLoader(batch_size=32, shuffle=False)`.

Differences from the reference, all of which make this baseline *faster* than the reference, so
the JAX/torch ratio is if anything an underestimate:
- images are held in memory as a uint8 array (the reference opens and decodes an image file in
  every `__getitem__`);
- the reference's dataset also computes a second, strong view per sample (colour jitter, affine,
  flips, rotation) that FedNML's training never reads; it is not computed here.
The weak view is the reference's own operation: what torchvision's `RandomAffine(degrees=10,
translate=(0.02, 0.02))` and `RandomHorizontalFlip()` do to a PIL image (one PIL affine
transform, nearest-neighbour, a shift of a whole number of pixels, zero fill; a PIL mirror), then
`ToTensor` and `Normalize`, written out here with PIL so that torchvision is not needed. (Until
2026-11-23 this baseline used `affine_grid` + `grid_sample`, bilinear, which cost 1.1 ms per
256-px image on the CPU against 0.33 ms for the PIL transform, so it made the baseline slower than
the reference; the ratios measured before that date overstate JAX's lead by that much.)

Models: `SmallCNN` and `ResNet18` below mirror the Flax models in `fednml_jax/models/` layer for
layer (bias-free convolutions, BatchNorm with PyTorch's momentum 0.1 / epsilon 1e-5 or GroupNorm,
the same widths, pooling and head), so both sides do the same arithmetic per image.

torch is an optional dependency (`pip install .[bench]`); nothing in `fednml_jax` imports this.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from torch import nn
from torch.utils.data import DataLoader, Dataset

MAX_GROUPS = 32


# Models ------------------------------------------------------------------------------------------
def _group_count(channels: int) -> int:
  for groups in range(min(MAX_GROUPS, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def _norm(norm: str, channels: int) -> nn.Module:
  if norm == "batch":
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)
  if norm == "group":
    return nn.GroupNorm(_group_count(channels), channels, eps=1e-5)
  raise ValueError(f"unknown norm {norm!r}")


def _init_conv(module: nn.Module):
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class SmallCNN(nn.Module):
  """`fednml_jax.models.SmallCNN`: conv3x3 (no bias)-norm-ReLU-maxpool2 blocks, mean pool, head."""

  def __init__(self, num_outputs: int, widths: Sequence[int], in_channels: int = 3,
               norm: str = "batch"):
    super().__init__()
    blocks, channels = [], in_channels
    for width in widths:
      blocks.append(nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                                  _norm(norm, width), nn.ReLU(inplace=True)))
      channels = width
    self.blocks = nn.ModuleList(blocks)
    self.head = nn.Linear(channels, num_outputs)
    _init_conv(self)

  def forward(self, x):
    for block in self.blocks:
      x = block(x)
      if min(x.shape[2:]) >= 2:  # as the Flax model: pool only while the map is at least 2x2
        x = F.max_pool2d(x, 2, 2)
    return self.head(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = _norm(norm, planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = _norm(norm, planes)
    self.downsample = None
    if stride != 1 or in_planes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      _norm(norm, planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class ResNet18(nn.Module):
  """torchvision's ResNet-18 layout (`fednml_jax.models.ResNet18`), written in plain torch.nn."""

  def __init__(self, num_outputs: int, in_channels: int = 3, norm: str = "batch"):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    self.bn1 = _norm(norm, 64)
    layers, in_planes = [], 64
    for stage in range(4):
      planes = 64 * 2 ** stage
      for index in range(2):
        stride = 2 if stage > 0 and index == 0 else 1
        layers.append(BasicBlock(in_planes, planes, stride, norm))
        in_planes = planes
    self.layers = nn.Sequential(*layers)
    self.head = nn.Linear(512, num_outputs)
    _init_conv(self)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.max_pool2d(x, 3, 2, 1)
    x = self.layers(x)
    return self.head(x.mean(dim=(2, 3)))


def build_model(name: str, num_outputs: int, in_channels: int, norm: str = "batch",
                widths: Sequence[int] = (16, 32, 64)) -> nn.Module:
  if name == "small_cnn":
    return SmallCNN(num_outputs, widths, in_channels, norm)
  if name == "resnet18":
    return ResNet18(num_outputs, in_channels, norm)
  raise ValueError(f"the torch baseline has no model {name!r} (small_cnn, resnet18)")


# Data --------------------------------------------------------------------------------------------
def weak_view(image: np.ndarray, max_degrees: float, max_translate: float,
              hflip: bool) -> torch.Tensor:
  """The reference's weak view of a uint8 (H, W, C) image as a float (C, H, W) tensor in [0, 1]:
  torchvision's `RandomAffine(degrees, translate=(t, t))` on a PIL image (an angle uniform in
  ±max_degrees, a shift of round(uniform(±t·size)) pixels, rotation about the image centre,
  nearest-neighbour sampling, zero fill), `RandomHorizontalFlip()` and `ToTensor()`."""
  h, w, channels = image.shape
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  angle = math.radians(float(torch.empty(()).uniform_(-max_degrees, max_degrees)))
  tx = round(float(torch.empty(()).uniform_(-max_translate * w, max_translate * w)))
  ty = round(float(torch.empty(()).uniform_(-max_translate * h, max_translate * h)))
  # PIL's affine transform maps each output pixel (x, y) to the input pixel (a·x + b·y + c,
  # d·x + e·y + f): the inverse of "rotate about the centre (cx, cy), then shift by (tx, ty)".
  cos, sin = math.cos(angle), math.sin(angle)
  cx, cy = 0.5 * w, 0.5 * h
  ux, uy = cx + tx, cy + ty
  inverse = (cos, sin, cx - cos * ux - sin * uy, -sin, cos, cy + sin * ux - cos * uy)
  pil = pil.transform((w, h), Image.Transform.AFFINE, inverse,
                      resample=Image.Resampling.NEAREST, fillcolor=0)
  if hflip and bool(torch.rand(()) < 0.5):
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return to_tensor(np.asarray(pil).reshape(h, w, channels))


def to_tensor(image: np.ndarray) -> torch.Tensor:
  """A uint8 (H, W, C) image as a float (C, H, W) tensor in [0, 1] (torchvision's `ToTensor`)."""
  return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)


class ClientDataset(Dataset):
  """One client's images (uint8 NHWC in memory), augmented and normalised in `__getitem__`, as the
  reference's `DatasetSplit` over its `MuReD` dataset. Items: (image, observed labels, index)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
               mean: np.ndarray, std: np.ndarray, augment: dict | None):
    self.images, self.labels, self.indices = images, labels, np.asarray(indices)
    self.mean = torch.tensor(np.asarray(mean, np.float32)).view(-1, 1, 1)
    self.std = torch.tensor(np.asarray(std, np.float32)).view(-1, 1, 1)
    self.augment = augment

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, item):
    index = int(self.indices[item])
    if self.augment is not None:
      x = weak_view(self.images[index], self.augment["rotation_degrees"],
                    self.augment["translate"], self.augment["hflip"])
    else:
      x = to_tensor(self.images[index])
    x = (x - self.mean) / self.std
    return x, torch.from_numpy(self.labels[index].astype(np.float32)), index


# The federation ----------------------------------------------------------------------------------
class Timer:
  """Sums wall time per key; synchronises CUDA at each boundary so GPU work is attributed."""

  def __init__(self, device: torch.device):
    self.device = device
    self.seconds: dict[str, float] = {}

  def sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def add(self, key: str, seconds: float):
    self.seconds[key] = self.seconds.get(key, 0.0) + seconds


class TorchFederation:
  """The clients, global model and label tables of one PyTorch run; `run_round` is one round."""

  def __init__(self, *, model_name: str, num_outputs: int, norm: str, widths: Sequence[int],
               train_images: np.ndarray, observed_labels: np.ndarray,
               client_indices: Sequence[np.ndarray], annotated: np.ndarray, mean, std,
               augment: dict, batch_size: int, local_epochs: int, lr: float, weight_decay: float,
               device: str | None = None, num_workers: int = 0, seed: int = 0,
               warmup_rounds: int = 10, refine_every: int = 5, hard_high: float = 0.9,
               hard_low: float = 0.1, missing_momentum: float = 0.8, tau: float = 1.0):
    torch.manual_seed(seed)
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.batch_size, self.local_epochs = batch_size, local_epochs
    self.lr, self.weight_decay = lr, weight_decay
    self.num_workers = num_workers
    self.warmup_rounds, self.refine_every = warmup_rounds, refine_every
    self.hard_high, self.hard_low = hard_high, hard_low
    self.missing_momentum, self.tau = missing_momentum, tau
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.train_images = train_images
    in_channels = train_images.shape[-1]
    self.global_model = build_model(model_name, num_outputs, in_channels, norm,
                                    widths).to(self.device)
    self.clients = []
    for k, indices in enumerate(client_indices):
      dataset = ClientDataset(train_images, observed_labels, indices, mean, std, augment)
      loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
      active = np.flatnonzero(np.asarray(annotated[k], bool))
      # The client's label table (the reference's `dataset_ALR`), over the whole train split.
      table = np.asarray(observed_labels, np.float32).copy()
      class_counts = table[np.asarray(indices)].sum(axis=0).astype(np.float64)
      self.clients.append({"loader": loader, "active": active,
                           "missing": np.flatnonzero(~np.asarray(annotated[k], bool)),
                           "table": table, "class_counts": class_counts,
                           "size": len(indices), "refinements": 0})

  # Steps -----------------------------------------------------------------------------------------
  def optimizer_steps(self) -> int:
    return sum(self.local_epochs * -(-c["size"] // self.batch_size) for c in self.clients)

  def _batches(self, loader, timer: Timer):
    """Iterates `loader`, charging the time spent producing each batch to `data`."""
    iterator = iter(loader)
    while True:
      start = time.perf_counter()
      try:
        batch = next(iterator)
      except StopIteration:
        return
      timer.add("data", time.perf_counter() - start)
      yield batch

  def _local_update(self, client: dict, phase: str, w_kd: float, timer: Timer):
    model = copy.deepcopy(self.global_model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
    teacher = None
    if phase == "refine":
      teacher = copy.deepcopy(self.global_model).eval()
      prior = torch.as_tensor(client["class_counts"] / client["size"], dtype=torch.float32,
                              device=self.device)
      pos_shift = self.tau * torch.log(prior.clamp(min=1e-12))
      neg_shift = self.tau * torch.log((1.0 - prior).clamp(min=1e-12))
    active = torch.as_tensor(client["active"], device=self.device)
    epoch_losses = []
    for _ in range(self.local_epochs):
      step_losses = []
      for images, labels, items in self._batches(client["loader"], timer):
        images = images.to(self.device)
        if phase == "refine":
          targets = torch.as_tensor(client["table"][items.numpy()], device=self.device)
          with torch.no_grad():
            soft = torch.sigmoid(teacher(images))
          logits = model(images)
          adjusted = logits + torch.where(targets == 1, pos_shift, neg_shift)
          distill = F.binary_cross_entropy(torch.sigmoid(adjusted), soft)
          supervised = F.binary_cross_entropy_with_logits(adjusted, targets)
          loss = w_kd * distill + (1.0 - w_kd) * supervised
        else:
          labels = labels.to(self.device)
          logits = model(images)
          per_entry = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
          loss = per_entry[:, active].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_losses.append(loss.item())  # a host read per step, as the reference logs it
      epoch_losses.append(sum(step_losses) / max(len(step_losses), 1))
    return model.state_dict(), sum(epoch_losses) / len(epoch_losses)

  @staticmethod
  def _average(states: list[dict]) -> dict:
    out = {}
    for key in states[0]:
      stacked = torch.stack([s[key] for s in states])
      if stacked.is_floating_point():
        out[key] = stacked.mean(dim=0)
      else:
        out[key] = torch.div(stacked.sum(dim=0), len(states), rounding_mode="floor")
    return out

  # Refinement --------------------------------------------------------------------------------------
  def _refine_client(self, client: dict, w_kd: float, timer: Timer):
    """The reference's label correction of one client: device pass, host transfer, GMM, updates."""
    model = copy.deepcopy(self.global_model).eval()
    all_probs, all_labels, all_indices = [], [], []
    with torch.no_grad():
      timer.sync()
      start = time.perf_counter()
      for images, _, items in self._batches(client["loader"], timer):
        probs = torch.sigmoid(model(images.to(self.device)))
        timer.sync()
        mid = time.perf_counter()
        timer.add("refine_device", mid - start)
        all_probs.append(probs.cpu())
        all_labels.append(torch.as_tensor(client["table"][items.numpy()]))
        all_indices.extend(int(i) for i in items)
        start = time.perf_counter()
        timer.add("refine_transfer", start - mid)
    start = time.perf_counter()
    probs = torch.cat(all_probs).double()
    labels = torch.cat(all_labels).double()
    columns = client["active"] if client["refinements"] == 0 else np.arange(labels.shape[1])
    p, y = probs[:, columns], labels[:, columns]
    consistency = (y * p + (1 - y) * (1 - p)).mean(dim=1)
    loss = F.binary_cross_entropy(p, y, reduction="none").mean(dim=1)
    features = torch.stack([consistency, -loss], dim=1).numpy()
    gmm = GaussianMixture(n_components=2, random_state=0)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      try:
        gmm.fit(features)
        assignment = gmm.predict(features)
        noisy_rows = np.flatnonzero(assignment == int(np.argmin(gmm.means_[:, 0])))
      except (ValueError, np.linalg.LinAlgError):  # degenerate features: flag none
        noisy_rows = np.zeros(0, np.int64)
    probs_np = probs.numpy()
    table, active, missing = client["table"], client["active"], client["missing"]
    # Per-sample Python loops over the host table, as the reference rewrites `dataset_ALR`.
    for row in noisy_rows:
      q = probs_np[row]
      q = np.where(q > self.hard_high, 1.0, np.where(q < self.hard_low, 0.0, q))
      table[all_indices[row], active] = q[active]
    m = self.missing_momentum
    for row, index in enumerate(all_indices):
      q = probs_np[row]
      q = np.where(q > self.hard_high, 1.0, np.where(q < self.hard_low, 0.0, q))
      table[index, missing] = (1 - m) * q[missing] + m * table[index, missing]
    client["class_counts"] = (table[all_indices].sum(axis=0) * w_kd
                              + client["class_counts"] * (1 - w_kd))
    client["refinements"] += 1
    timer.add("refine_host", time.perf_counter() - start)

  # Rounds ----------------------------------------------------------------------------------------
  def is_refinement_round(self, rnd: int) -> bool:
    return rnd >= self.warmup_rounds and (rnd - self.warmup_rounds) % self.refine_every == 0

  def run_round(self, rnd: int, method: str, w_kd: float = 0.0):
    """One round of `method` ("fedavg" or "fednml"); returns (client losses, {part: seconds}).

    Parts: `train` (local updates and averaging; `train_data` of it was spent in the DataLoader)
    and, in FedNML refinement rounds, `refine_device` (the pass over the DataLoader, of which
    `refine_data` was spent producing batches on the CPU), `refine_transfer` (`.cpu()` of each
    batch's probabilities) and `refine_host` (features, GMM and label-table loops). `data` is
    the total DataLoader time.
    """
    timer = Timer(self.device)
    phase = "train"
    if method == "fednml":
      phase = "warmup" if rnd < self.warmup_rounds else "refine"
      if self.is_refinement_round(rnd):
        for client in self.clients:
          self._refine_client(client, w_kd, timer)
    elif method != "fedavg":
      raise ValueError(f"the torch baseline has no method {method!r} (fedavg, fednml)")
    data_before = timer.seconds.get("data", 0.0)
    timer.seconds["refine_data"] = data_before
    timer.sync()
    start = time.perf_counter()
    states, losses = [], []
    for client in self.clients:
      state, loss = self._local_update(client, phase, w_kd, timer)
      states.append(state)
      losses.append(loss)
    self.global_model.load_state_dict(self._average(states))
    timer.sync()
    timer.add("train", time.perf_counter() - start)
    timer.seconds["train_data"] = timer.seconds.get("data", 0.0) - data_before
    return losses, timer.seconds

  def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities of the global model in eval mode (the reference's `test_inference` loop)."""
    dataset = ClientDataset(images, np.zeros((len(images), 1), np.uint8), np.arange(len(images)),
                            self.mean, self.std, augment=None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        num_workers=self.num_workers)
    self.global_model.eval()
    out = []
    with torch.no_grad():
      for x, _, _ in loader:
        out.append(torch.sigmoid(self.global_model(x.to(self.device))).cpu().numpy())
    return np.concatenate(out)

  def evaluate(self, splits: dict[str, np.ndarray], score: Callable[[str, np.ndarray], dict]):
    """{split: score(split, probabilities)} for each split's images."""
    return {name: score(name, self.predict(images)) for name, images in splits.items()}
