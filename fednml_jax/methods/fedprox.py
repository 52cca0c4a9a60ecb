"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020) on partially annotated multi-label data.

Each client minimises FedAvg's loss (BCE-with-logits on the classes it annotates, see `fedavg.py`)
plus the proximal term `μ/2·‖w − w_global‖²`, the squared distance of its parameters to the round's
global parameters. The term covers the trainable parameters only, not the BatchNorm statistics
(which receive no gradient). The server aggregates as FedAvg does (`config.aggregation`, weights by
`fl.client_weighting`).

`fedprox.mu` defaults to 0.01: the paper tunes μ over {0.001, 0.01, 0.1, 1} per dataset and reports
no single best value; 0.01 is a mild choice in the middle of that grid (it keeps FedProx close to
FedAvg). Tune it per dataset for a fair comparison. Note that the engine's local
optimizer is AdamW (the FedNML reference's), whose per-coordinate scaling also rescales the
proximal gradient, whereas the paper analyses SGD: the same μ is not the same regularisation
strength as in the paper. μ = 0 is exactly FedAvg.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fednml_jax.errors import ConfigError
from fednml_jax.methods.fedavg import FedAvg


def proximal_term(params, global_params, mu):
  """`μ/2 · Σ_leaves ‖w − w_global‖²` (accumulated in float32)."""
  squares = jax.tree.map(
      lambda w, g: jnp.sum(jnp.square(w.astype(jnp.float32) - g.astype(jnp.float32))),
      params, global_params)
  return 0.5 * mu * sum(jax.tree.leaves(squares), jnp.float32(0.0))


class FedProx(FedAvg):
  name = "fedprox"

  @classmethod
  def config_defaults(cls):
    c = ml_collections.ConfigDict()
    c.mu = 0.01  # proximal weight μ (the paper's grid: 0.001, 0.01, 0.1, 1)
    return c

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.mu = float(config.fedprox.mu)
    if not self.mu >= 0.0:
      raise ConfigError(f"config.fedprox.mu = {config.fedprox.mu!r} must be non-negative.")

  def penalty(self, phase, *, params, global_params, client, scalars, epoch_step):
    del phase, client, scalars, epoch_step
    return proximal_term(params, global_params, self.mu)
