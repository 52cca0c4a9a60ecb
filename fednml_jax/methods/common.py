"""Small pieces several methods share: config checks, a guarded two-component Gaussian-mixture fit
(host side, scikit-learn) and the formatting of diagnostics."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from fednml_jax.errors import ConfigError


def is_int(value) -> bool:
  """An integer that is not a bool (config values)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_constants(section: str, cfg, checks) -> None:
  """Raises a ConfigError naming `config.<section>.<key>` for the first `(key, ok, what)` of
  `checks` whose `ok` is False ("must be <what>")."""
  for key, ok, what in checks:
    if not ok:
      raise ConfigError(f"config.{section}.{key} = {cfg[key]!r} must be {what}.")


def fit_two_component_gmm(features, seed: int, *, min_samples: int = 2,
                          require_convergence: bool = False):
  """`GaussianMixture(n_components=2, random_state=seed)` (full covariance, fitted from scratch)
  on `features` (n,) or (n, d), guarded against inputs it cannot split.

  Returns `(assignment (n,) int, gmm, None)`, or `(None, None, reason)` when there are fewer than
  `min_samples` rows, non-finite values, fewer than two distinct rows, a fit that raises, or (with
  `require_convergence`) a fit that does not converge."""
  features = np.asarray(features, np.float64)
  if features.ndim == 1:
    features = features[:, None]
  n = features.shape[0]
  if n < max(min_samples, 2):
    return None, None, f"too few samples for the GMM ({n} < {max(min_samples, 2)})"
  if not np.all(np.isfinite(features)):
    return None, None, "non-finite GMM features"
  if len(np.unique(features, axis=0)) < 2:
    return None, None, "identical GMM features (zero variance)"
  gmm = GaussianMixture(n_components=2, random_state=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    try:
      assignment = gmm.fit(features).predict(features)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
      return None, None, f"GMM fit failed: {type(err).__name__}: {err}"
  if require_convergence and not gmm.converged_:
    return None, None, "GMM did not converge"
  return assignment, gmm, None


def ratio(num, den):
  """num / den as a float, None when den is 0."""
  return float(num) / float(den) if den else None


def mean_or_none(values):
  return float(np.mean(values)) if len(values) else None


def nan_to_none(matrix):
  """A matrix as nested lists with NaN as None (JSON), or None."""
  if matrix is None:
    return None
  return [[None if np.isnan(v) else float(v) for v in row] for row in np.asarray(matrix)]


def fmt(value):
  """A diagnostic for a log line: three decimals, or n/a."""
  return "n/a" if value is None else f"{value:.3f}"
