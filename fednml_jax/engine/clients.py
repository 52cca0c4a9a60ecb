"""Clients as padded arrays: the host-side layout every method and the engine share.

Client k owns `counts[k]` training samples. Per-sample arrays are padded to `n_max` slots on a
leading client axis, `(K, n_max, ...)`; slot j of client k is real when `valid[k, j]`. Padded slots
point at image 0 and weigh 0 everywhere. Clients may also be padded (to a multiple of the device
count): a padding client has count 0 and is ignored by aggregation.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientLayout:
  """Which training images each client holds, padded to a rectangle."""

  sample_index: np.ndarray  # int32 (K, n_max): index into the train split
  valid: np.ndarray  # bool (K, n_max)
  counts: np.ndarray  # int32 (K,)
  num_real_clients: int

  @classmethod
  def from_indices(cls, client_indices: list[np.ndarray], pad_clients_to: int = 1) -> "ClientLayout":
    num_real = len(client_indices)
    num_clients = -(-num_real // pad_clients_to) * pad_clients_to
    n_max = max(1, max(len(ix) for ix in client_indices))
    sample_index = np.zeros((num_clients, n_max), np.int32)
    valid = np.zeros((num_clients, n_max), bool)
    counts = np.zeros((num_clients,), np.int32)
    for k, ix in enumerate(client_indices):
      sample_index[k, :len(ix)] = ix
      valid[k, :len(ix)] = True
      counts[k] = len(ix)
    return cls(sample_index, valid, counts, num_real)

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def slots(self) -> int:
    return int(self.sample_index.shape[1])

  def gather(self, per_image: np.ndarray, fill=0) -> np.ndarray:
    """Per-image rows (N, ...) of the train split → per-slot rows (K, n_max, ...), padding = fill."""
    out = np.asarray(per_image)[self.sample_index]
    mask = self.valid.reshape(self.valid.shape + (1,) * (out.ndim - 2))
    return np.where(mask, out, np.asarray(fill, out.dtype))

  def pad_clients(self, per_client: np.ndarray, fill=0) -> np.ndarray:
    """Per-real-client rows (K_real, ...) → (K, ...) with padding clients filled with `fill`."""
    per_client = np.asarray(per_client)
    pad = self.num_clients - per_client.shape[0]
    if pad == 0:
      return per_client
    filler = np.full((pad,) + per_client.shape[1:], fill, per_client.dtype)
    return np.concatenate([per_client, filler])
