"""The method interface: what a federated method plugs into the engine.

A method is a small object of pure pieces, named after the paper's pseudo-code:
- `phase(round)`: a short name for the round's program (e.g. "warmup", "refine"); the engine
  compiles one program per phase, so round-dependent numbers go into `scalars`, not the phase.
- `init_state()` / `before_round(...)`: host-side state (plain numpy, checkpointed) and the work
  done on the host between rounds (e.g. label refinement with a Gaussian mixture).
- `client_arrays(state)`: the per-sample (K, n_max, ...) and per-client (K, ...) arrays the clients
  train on, put on the device when they change.
- `scalars(round, state)`: round-dependent numbers (traced, so they do not trigger recompilation).
- `local_loss(phase, ctx)`: the per-sample training loss of one local step, from a
  `engine.local_training.LocalBatch` (views of the batch, the student model, the global model, the
  method's local state). The default runs the student on the weak view and calls the simpler
  `client_loss(...)`, which is all most methods need to write.
- `penalty(...)`: an optional regulariser on the parameters (e.g. FedProx's proximal term); it
  sees the step's index within its local epoch.
- `init_local` / `update_local` / `local_output`: a local state carried through the client's
  local steps (e.g. an EMA teacher, per-sample label logits whose `trainable` entry receives
  gradients), its update after each optimizer step, and what the client returns to the host.
- `after_round(...)`: host work on the clients' `local_output`s after the round.
- `aggregate(...)`: the server's rule, on client variables stacked on a leading axis.

`supported_tasks` names the task types (`config.task`) a method's losses are written for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from fednml_jax import aggregation
from fednml_jax.engine.clients import ClientLayout


@dataclasses.dataclass(frozen=True)
class FederatedSetup:
  """Everything a method may read about the simulated federation (host arrays)."""

  config: Any
  task: Any
  layout: ClientLayout
  observed_labels: np.ndarray  # (N_train, C): after noise and missing-class masking
  noisy_labels: np.ndarray  # (N_train, C): after noise, before masking
  clean_labels: np.ndarray  # (N_train, C): the truth, for diagnostics only
  corrupted: np.ndarray  # bool (N_train,): ground truth of which samples were corrupted
  annotated: np.ndarray  # bool (K, C), padded to the layout's client count (padding: False)

  @property
  def num_classes(self) -> int:
    return int(self.observed_labels.shape[1])


@dataclasses.dataclass
class RoundContext:
  """What `before_round` can use: the round, the global model and a pass over the train images."""

  round: int
  global_vars: Any
  # callable(with_features=False) -> (K, n_max, C) global-model probabilities on every client's
  # training slots under the weak view (numpy), or (probabilities, (K, n_max, D) features).
  predict_train: Any
  plots_dir: str | None = None  # where diagnostic figures go when `config.plots` is True


class Method:
  """Defaults shared by every method: one phase, no host state, `config.aggregation`."""

  name = "base"
  supported_tasks = ("multilabel", "singlelabel")

  def __init__(self, config, setup: FederatedSetup):
    self.config = config
    self.setup = setup
    self.task = setup.task

  @classmethod
  def config_defaults(cls):
    return None

  # Host side -----------------------------------------------------------------------------------
  def phase(self, rnd: int) -> str:
    del rnd
    return "train"

  def uses_teacher(self, phase: str) -> bool:
    del phase
    return False

  def init_state(self) -> dict:
    return {}

  def before_round(self, ctx: RoundContext, state: dict) -> tuple[dict, bool, dict]:
    """Host work before round `ctx.round`: returns (state, client_arrays_changed, log_record)."""
    del ctx
    return state, False, {}

  def client_arrays(self, state: dict) -> tuple[dict, dict]:
    """Per-sample `targets` are the observed labels; per-client `class_mask` the annotated classes."""
    del state
    layout = self.setup.layout
    per_sample = {"targets": layout.gather(self.setup.observed_labels).astype(np.float32)}
    per_client = {"class_mask": self.setup.annotated.astype(np.float32)}
    return per_sample, per_client

  def scalars(self, rnd: int, state: dict) -> dict:
    del rnd, state
    return {}

  def after_round(self, rnd: int, state: dict, outputs: dict) -> tuple[dict, bool, dict]:
    """Host work after round `rnd` on the clients' stacked `local_output`s (numpy, padding clients
    included): returns (state, client_arrays_changed, log_record)."""
    del rnd, outputs
    return state, False, {}

  # Device side (traced) ------------------------------------------------------------------------
  def local_loss(self, phase, ctx):
    """Per-sample loss (B,) and an aux pytree for `update_local`, for one `LocalBatch`."""
    x = ctx.view("weak")
    logits, _ = ctx.student(x)
    teacher_logits = ctx.frame.teacher_logits(x) if self.uses_teacher(phase) else None
    per_sample = self.client_loss(phase, logits=logits, batch=ctx.batch, client=ctx.frame.client,
                                  teacher_logits=teacher_logits, scalars=ctx.frame.scalars)
    return per_sample, {}

  def client_loss(self, phase, *, logits, batch, client, teacher_logits, scalars):
    raise NotImplementedError

  def penalty(self, phase, *, params, global_params, client, scalars, epoch_step):
    """A regulariser added to the batch loss at each local step; `epoch_step` is the step's
    index within its local epoch (traced)."""
    del phase, params, global_params, client, scalars, epoch_step
    return jnp.float32(0.0)

  def init_local(self, phase, frame, key) -> dict:
    """The local state at the start of a client's round (a dict pytree; `trainable` receives
    gradients)."""
    del phase, frame, key
    return {}

  def update_local(self, phase, local, *, frame, grads, aux, slot, weight, active, epoch_end,
                   params, batch_stats) -> dict:
    """The local state after one optimizer step. `grads` are the loss's gradients with respect to
    `local["trainable"]`; `active` is False on a step whose batch is all padding; `epoch_end` is
    True on the last step of each local epoch; `params` / `batch_stats` are the updated model's."""
    del phase, frame, grads, aux, slot, weight, active, epoch_end, params, batch_stats
    return local

  def local_output(self, phase, local, *, frame, variables, key):
    """What the client sends back to the host besides its variables (a pytree; `{}`). `key` is
    the client's round key also given to `init_local` (e.g. for a weak-view pass over its
    samples)."""
    del phase, local, frame, variables, key
    return {}

  def aggregate(self, client_vars, clients, global_vars):
    """`config.aggregation` (default "mean": the weighted mean) with weights from
    `fl.client_weighting`; `config.aggregation_options` tune the robust rules."""
    del global_vars
    weights = aggregation.client_weights(clients["count"], self.config.fl.client_weighting)
    return aggregation.aggregate_by_name(self.config.aggregation, client_vars, weights,
                                         **self.config.aggregation_options)
