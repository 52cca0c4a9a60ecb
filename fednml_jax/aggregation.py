"""Server aggregation rules: pure functions from stacked client variables to global variables.

Client variables arrive stacked on a leading client axis (`tree.shape = (K, ...)`); every rule
returns one pytree without that axis. BatchNorm statistics are aggregated like parameters, as the
reference does (`average_weights` over the whole state dict).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_mean(stacked, weights):
  """Σ_k w_k·θ_k / Σ_k w_k over the leading client axis (FedAvg; weights = sample counts).

  Clients with weight 0 (padding clients) do not contribute.
  """
  weights = jnp.asarray(weights, jnp.float32)
  weights = weights / jnp.sum(weights)

  def combine(leaf):
    w = weights.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
    return jnp.sum(w * leaf, axis=0)

  return jax.tree.map(combine, stacked)


def client_weights(sample_counts, rule: str):
  """Aggregation weights: `sample_count` (n_k) or `uniform` (1 per real client, 0 for padding)."""
  counts = jnp.asarray(sample_counts, jnp.float32)
  if rule == "sample_count":
    return counts
  if rule == "uniform":
    return (counts > 0).astype(jnp.float32)
  raise ValueError(f"unknown client weighting {rule!r}")
