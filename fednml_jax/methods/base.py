"""The method interface: what a federated method plugs into the engine.

A method is a small object of pure pieces, named after the paper's pseudo-code:
- `phase(round)`: a short name for the round's program (e.g. "warmup", "refine"); the engine
  compiles one program per phase, so round-dependent numbers go into `scalars`, not the phase.
- `init_state()` / `before_round(...)`: host-side state (plain numpy, checkpointed) and the work
  done on the host between rounds (e.g. label refinement with a Gaussian mixture).
- `client_arrays(state)`: the per-sample (K, n_max, ...) and per-client (K, ...) arrays the clients
  train on, put on the device when they change.
- `scalars(round, state)`: round-dependent numbers (traced, so they do not trigger recompilation).
- `client_loss(...)`: the per-sample training loss inside the jitted local step.
- `penalty(...)`: an optional regulariser on the parameters (e.g. FedProx's proximal term).
- `aggregate(...)`: the server's rule, on client variables stacked on a leading axis.
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
  predict_train: Any  # callable(view: str) -> (K, n_max, C) global-model probabilities (numpy)


class Method:
  """Defaults shared by every method: one phase, no host state, `config.aggregation`."""

  name = "base"

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

  # Device side (traced) ------------------------------------------------------------------------
  def client_loss(self, phase, *, logits, batch, client, teacher_logits, scalars):
    raise NotImplementedError

  def penalty(self, phase, *, params, global_params, scalars):
    del phase, params, global_params, scalars
    return jnp.float32(0.0)

  def aggregate(self, client_vars, clients, global_vars):
    """`config.aggregation` (default "mean": the weighted mean) with weights from
    `fl.client_weighting`; `config.aggregation_options` tune the robust rules."""
    del global_vars
    weights = aggregation.client_weights(clients["count"], self.config.fl.client_weighting)
    return aggregation.aggregate_by_name(self.config.aggregation, client_vars, weights,
                                         **self.config.aggregation_options)
