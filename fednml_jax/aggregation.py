"""Server aggregation rules: pure functions from stacked client variables to global variables.

Client variables arrive stacked on a leading client axis (`tree.shape = (K, ...)`); every rule
returns one pytree without that axis. BatchNorm statistics are aggregated like parameters, as the
reference does (`average_weights` over the whole state dict).

Rules: `weighted_mean` (FedAvg), `geometric_median` (RFA / MaskedOptim), `coordinate_median` and
`trimmed_mean` (Yin et al. 2018), `krum` (Blanchard et al. 2017), selectable by name through
`AGGREGATORS` / `aggregate_by_name` (`config.aggregation`), and FedNoRo's `daagg`, which also needs
the noisy-client mask. Weights come from `client_weights`; a client of weight 0 is padding and never
influences any rule.
"""

from __future__ import annotations

import fractions

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


# Robust aggregators ------------------------------------------------------------------------------
# All take the same (stacked, weights) as `weighted_mean` and return the same pytree structure,
# shapes and dtypes. A client is *real* when its weight is > 0; padding clients (weight 0) never
# influence any rule: the order statistics sort them behind the real values (+inf fill) and the
# distance-based rules give them +inf distance / weight 0. Shapes stay static (no boolean indexing),
# so every rule runs inside `jax.jit` with the number of real clients traced. Arithmetic is float32
# (results are cast back to each leaf's dtype) and uses elementwise products and sums rather than
# matmuls, so GPUs do not silently drop to TF32.


def _real_clients(weights):
  """(weights as float32, real-client mask, number of real clients as int32)."""
  weights = jnp.asarray(weights, jnp.float32)
  real = weights > 0
  return weights, real, jnp.sum(real.astype(jnp.int32))


def _broadcast_clients(vector, leaf):
  """A (K,) vector shaped to broadcast against a (K, ...) leaf."""
  return vector.reshape((-1,) + (1,) * (leaf.ndim - 1))


def _sorted_real_values(leaf, real):
  """The leaf sorted over clients, padding clients replaced by +inf so they sort last."""
  values = leaf.astype(jnp.float32)
  return jnp.sort(jnp.where(_broadcast_clients(real, values), values, jnp.inf), axis=0)


def _pairwise_sq_distances(stacked):
  """(L, K, K): for every leaf l, ‖θ_i^l − θ_j^l‖² between all pairs of clients.

  Computed as exact differences (one `lax.map` over clients, O(K·size) memory per step), not from
  a Gram matrix, whose cancellation would swamp the small distances between client models.
  """
  leaves = jax.tree.leaves(stacked)
  flats = [leaf.reshape(leaf.shape[0], -1).astype(jnp.float32) for leaf in leaves]
  num_clients = flats[0].shape[0]

  def row(i):
    return jnp.stack([jnp.sum(jnp.square(flat - flat[i]), axis=1) for flat in flats])  # (L, K)

  rows = jax.lax.map(row, jnp.arange(num_clients))  # (K_i, L, K_j)
  return jnp.transpose(rows, (1, 0, 2))


def geometric_median(stacked, weights, iters: int = 10, eps: float = 1e-5):
  """Per-tensor weighted geometric median by Weiszfeld's algorithm.

  The geometric median argmin_z Σ_k w_k·‖θ_k − z‖ as a robust aggregate is RFA (Pillutla, Kakade
  and Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022); MaskedOptim (arXiv
  2506.02079, `fl_components/fed.py::RFA`) applies it to each tensor separately, which is what this
  does: every leaf gets its own median, with distances over that whole leaf.

  Weiszfeld iterations start from the weighted mean: `z ← Σ_k β_k θ_k / Σ_k β_k` with
  `β_k = w_k / max(‖θ_k − z‖, eps)` (distances floored at `eps`, so a client sitting on the median
  does not divide by zero). As in MaskedOptim, a leaf stops once an update would move it by less
  than `eps` (it keeps its current value), and at most `iters` (10) updates are made. MaskedOptim's
  weights are uniform; with `fl.client_weighting = "uniform"` this is its rule exactly. Padding
  clients (w = 0) get β = 0.
  """
  weights, _, _ = _real_clients(weights)

  def median(leaf):
    x = leaf.reshape(leaf.shape[0], -1).astype(jnp.float32)
    w = weights[:, None]
    z = jnp.sum(w * x, axis=0) / jnp.sum(weights)

    def step(_, carry):
      z, done = carry
      dist = jnp.sqrt(jnp.sum(jnp.square(x - z), axis=1))
      beta = (weights / jnp.maximum(dist, eps))[:, None]
      new = jnp.sum(beta * x, axis=0) / jnp.sum(beta)
      converged = jnp.sqrt(jnp.sum(jnp.square(new - z))) < eps
      stop = done | converged
      return jnp.where(stop, z, new), stop

    z, _ = jax.lax.fori_loop(0, iters, step, (z, jnp.bool_(False)))
    return z.reshape(leaf.shape[1:]).astype(leaf.dtype)

  return jax.tree.map(median, stacked)


def coordinate_median(stacked, weights):
  """Coordinate-wise median over the real clients (Yin, Chen, Ramchandran and Bartlett, "Byzantine-
  Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

  Unweighted: every client with weight > 0 counts once, whatever its sample count (the weights only
  say who is real). With an even number of real clients it is the mean of the two middle values
  (`numpy.median`'s convention; MaskedOptim's `torch.median` takes the lower one).
  """
  _, real, n = _real_clients(weights)
  lower = jnp.maximum((n - 1) // 2, 0)
  upper = jnp.maximum(n // 2, 0)

  def median(leaf):
    ordered = _sorted_real_values(leaf, real)
    middle = 0.5 * (jnp.take(ordered, lower, axis=0) + jnp.take(ordered, upper, axis=0))
    return middle.astype(leaf.dtype)

  return jax.tree.map(median, stacked)


def _trim_count(trim_fraction: float, n):
  """floor(trim_fraction · n) in exact integer arithmetic: the fraction is read as the nearest
  p/q with q ≤ 10 000 (so 0.1·10 is exactly 1, not 0.99999 → 0)."""
  frac = fractions.Fraction(trim_fraction).limit_denominator(10_000)
  return (n * frac.numerator) // frac.denominator


def trimmed_mean(stacked, weights, trim_fraction: float = 0.1):
  """Coordinate-wise trimmed mean (Yin et al., ICML 2018): for every coordinate, drop the
  b = floor(trim_fraction · K_real) largest and b smallest values among the real clients and
  average the remaining K_real − 2b, unweighted (the weights only say who is real).

  `trim_fraction` must be in [0, 0.5) so that at least one value remains; 0 is the unweighted mean
  of the real clients.
  """
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction = {trim_fraction} must be in [0, 0.5).")
  _, real, n = _real_clients(weights)
  b = _trim_count(trim_fraction, n)
  num_kept = jnp.maximum(n - 2 * b, 1).astype(jnp.float32)

  def trimmed(leaf):
    ordered = _sorted_real_values(leaf, real)
    position = jnp.arange(ordered.shape[0])
    keep = _broadcast_clients((position >= b) & (position < n - b), ordered)
    return (jnp.sum(jnp.where(keep, ordered, 0.0), axis=0) / num_kept).astype(leaf.dtype)

  return jax.tree.map(trimmed, stacked)


def krum(stacked, weights, num_byzantine: int = 1):
  """Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent", NeurIPS 2017): returns one real client's variables.

  Each real client i is scored by Σ_{j ∈ N_i} ‖θ_i − θ_j‖², the squared Euclidean distances over the
  whole flattened model (every leaf, BatchNorm statistics included) to its m = K_real − f − 2
  nearest other real clients (f = `num_byzantine`); the client with the smallest score is returned
  (the lowest index on ties). Krum needs m ≥ 1, i.e. K_real ≥ f + 3: with fewer real clients
  there is no neighbourhood to score, and this returns the weighted mean instead (`validate` refuses
  such a config up front). Padding clients are neither scored nor anyone's neighbour.
  (MaskedOptim's `Krum` scores by the sum over all clients; this follows the paper.)
  """
  weights, real, n = _real_clients(weights)
  sq = jnp.sum(_pairwise_sq_distances(stacked), axis=0)  # (K, K)
  num_clients = sq.shape[0]
  excluded = (~real)[None, :] | jnp.eye(num_clients, dtype=bool)
  nearest = jnp.sort(jnp.where(excluded, jnp.inf, sq), axis=1)
  m = n - num_byzantine - 2
  in_neighbourhood = jnp.arange(num_clients)[None, :] < m
  score = jnp.sum(jnp.where(in_neighbourhood, nearest, 0.0), axis=1)
  chosen = jnp.argmin(jnp.where(real, score, jnp.inf))
  fallback = weighted_mean(stacked, weights)
  return jax.tree.map(lambda leaf, mean: jnp.where(m >= 1, leaf[chosen], mean), stacked, fallback)


def daagg(stacked, weights, noisy_mask):
  """FedNoRo's distance-aware aggregation DaAgg (Wu et al., "FedNoRo: Towards Noise-Robust Federated
  Learning by Addressing Class Imbalance and Label Noise Heterogeneity", IJCAI 2023; wnn2000/FedNoRo
  `utils/FedAvg.py::DaAgg`).

  `w'_k ∝ w_k · exp(−d_k / max_j d_j)` followed by the weighted mean, where for a noisy client
  `d_k = min over clean clients c of Σ_tensors ‖θ_k − θ_c‖` (a sum of per-leaf L2 norms, BatchNorm
  statistics included, as the reference's `model_dist` over the float state dict) and `d_k = 0` for
  a clean client. FedNoRo's `w_k` is the sample count: pass `client_weights(count, "sample_count")`.
  `noisy_mask` is a (K,) bool array (True = detected noisy); padding clients are neither noisy nor
  clean. Without a noisy client, without a clean client (the reference would fail there), or when
  max d = 0 (every noisy client equals a clean one), this is the plain weighted mean.
  """
  weights, real, _ = _real_clients(weights)
  noisy_mask = jnp.asarray(noisy_mask, bool)
  noisy = noisy_mask & real
  clean = ~noisy_mask & real
  dist = jnp.sum(jnp.sqrt(_pairwise_sq_distances(stacked)), axis=0)  # (K, K)
  to_clean = jnp.min(jnp.where(clean[None, :], dist, jnp.inf), axis=1)
  d = jnp.where(noisy & jnp.any(clean), to_clean, 0.0)
  d_max = jnp.max(d)
  usable = d_max > 0
  scaled = jnp.where(usable, d / jnp.where(usable, d_max, 1.0), 0.0)
  return weighted_mean(stacked, weights * jnp.exp(-scaled))


# Names for `config.aggregation`. DaAgg is not here: it needs the noisy-client mask, so the methods
# that use it (FedNoRo, FedELC) call `daagg` directly.
AGGREGATORS = {
    "mean": weighted_mean,
    "geometric_median": geometric_median,
    "coordinate_median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
}

# `config.aggregation_options` key → (the aggregator that reads it, its keyword argument).
_OPTIONS = {
    "trim_fraction": ("trimmed_mean", "trim_fraction"),
    "num_byzantine": ("krum", "num_byzantine"),
    "geometric_median_iters": ("geometric_median", "iters"),
}


def aggregate_by_name(name: str, stacked, weights, **options):
  """`AGGREGATORS[name](stacked, weights, ...)`, given the keys of `config.aggregation_options`
  (`trim_fraction`, `num_byzantine`, `geometric_median_iters`); each aggregator receives only the
  options it reads, the others are ignored. Unknown names or option keys raise ValueError."""
  if name not in AGGREGATORS:
    raise ValueError(f"unknown aggregator {name!r}; one of {sorted(AGGREGATORS)}")
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise ValueError(f"unknown aggregation option(s) {unknown}; valid: {sorted(_OPTIONS)}")
  kwargs = {keyword: options[key] for key, (owner, keyword) in _OPTIONS.items()
            if owner == name and key in options}
  return AGGREGATORS[name](stacked, weights, **kwargs)
