"""Diagnostic figures (optional; `pip install -e '.[plots]'` installs matplotlib).

`plot_noise_gmm` draws FedNML's GMM features of one client at one refinement, `[consistency,
−loss]` per sample, coloured by the simulation's ground truth (corrupted or not) and marked by the
fit's decision (flagged noisy or not), with each fitted Gaussian component drawn as its 1- and 2-σ
ellipses. Written when `config.plots = True`, to `<workdir>/plots/`.
"""

from __future__ import annotations

import numpy as np

from fednml_jax.errors import ConfigError


def require_matplotlib():
  """Imports matplotlib with the non-interactive backend, or raises a ConfigError saying how to
  install it."""
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError:
    raise ConfigError("config.plots = True needs matplotlib, which is an optional dependency: "
                      "install it with `pip install -e '.[plots]'` (or `pip install matplotlib`), "
                      "or leave config.plots False.") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _ellipse(mean, covariance, scale):
  """Points (2, 100) of the `scale`-σ ellipse of a 2-D Gaussian."""
  values, vectors = np.linalg.eigh(np.asarray(covariance, np.float64))
  angle = np.linspace(0.0, 2.0 * np.pi, 100)
  circle = np.stack([np.cos(angle), np.sin(angle)])
  return np.asarray(mean)[:, None] + vectors @ (scale * np.sqrt(np.maximum(values, 0.0))[:, None]
                                               * circle)


def plot_noise_gmm(path, features, corrupted, flagged, gmm, title: str):
  """Writes a PNG at `path`: `features` (n, 2) = [consistency, −loss], `corrupted` and `flagged`
  (n,) bool, `gmm` a fitted 2-component full-covariance `GaussianMixture` (or None when the fit
  was skipped)."""
  plt = require_matplotlib()
  features = np.asarray(features, np.float64)
  corrupted, flagged = np.asarray(corrupted, bool), np.asarray(flagged, bool)
  fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
  groups = [(~corrupted & ~flagged, "clean, kept", "tab:blue", "o"),
            (~corrupted & flagged, "clean, flagged", "tab:blue", "x"),
            (corrupted & ~flagged, "corrupted, missed", "tab:red", "o"),
            (corrupted & flagged, "corrupted, flagged", "tab:red", "x")]
  for mask, label, colour, marker in groups:
    if mask.any():
      ax.scatter(features[mask, 0], features[mask, 1], s=12, c=colour, marker=marker,
                 alpha=0.7, label=f"{label} ({int(mask.sum())})")
  if gmm is not None:
    noisy_component = int(np.argmin(gmm.means_[:, 0]))
    for j in range(2):
      style = "--" if j == noisy_component else "-"
      for scale in (1.0, 2.0):
        x, y = _ellipse(gmm.means_[j], gmm.covariances_[j], scale)
        ax.plot(x, y, style, color="black", linewidth=0.8)
      ax.plot(*gmm.means_[j], "k+", markersize=10)
  ax.set_xlabel("consistency with the label table")
  ax.set_ylabel("−loss")
  ax.set_title(title + ("" if gmm is not None else " (GMM skipped)"), fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
