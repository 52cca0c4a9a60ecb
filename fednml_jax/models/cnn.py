"""A small convolutional network for fast CPU runs.

`SmallCNN` is a plain VGG-style stack meant for smoke tests and CPU experiments at 28-64 px: one
block per entry of `widths`, each a 3x3 convolution (no bias), normalisation (BatchNorm or
GroupNorm, as in `fednml_jax.models.resnet`), ReLU and a 2x2 max-pool with stride 2; then global
average pooling (the penultimate features, `widths[-1]` of them) and a dense head `head` with
`num_outputs` logits. With the default widths (32, 64, 128) it has about 93k parameters plus the
head. It is not a published architecture; use `ResNet18`/`ResNet50` for results to report.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fednml_jax.models.resnet import check_norm, conv, global_average_pool, norm_layer


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 max-pooling with stride 2 (an odd last row or column is dropped, as `nn.max_pool` with
  VALID padding does), written as a reshape and a max: XLA:CPU runs the gradient of
  `nn.max_pool` (select-and-scatter) slowly; measured on a SmallCNN-16 training step at 64 px,
  batch 32: 118 ms with `nn.max_pool`, 46 ms with this, the same losses over 20 steps. Where a
  window holds several equal maxima, the gradient is shared among them (`nn.max_pool` gives it all
  to the first); both are subgradients."""
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
  """conv3x3-norm-ReLU-maxpool blocks, global average pooling and a dense head.

  Attributes:
    num_outputs: logits per image (the number of labels).
    widths: channels of each block; its length is the number of blocks (and of halvings of the
      resolution).
    norm: "batch" (BatchNorm) or "group" (GroupNorm).
    dtype: compute dtype; parameters stay float32.
  """

  num_outputs: int
  widths: Sequence[int] = (32, 64, 128)
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, return_features: bool = False):
    """Logits (N, num_outputs), or `(logits, features)` with the pooled (N, widths[-1]) features.

    `x` is a float (N, H, W, C) batch that is already normalised; `train` selects batch
    statistics over the running averages (BatchNorm only).
    """
    check_norm(self.norm)
    x = jnp.asarray(x, self.dtype)
    for index, width in enumerate(self.widths):
      x = conv(width, 3, 1, self.dtype, f"conv{index + 1}")(x)
      x = norm_layer(self.norm, width, train, self.dtype, f"bn{index + 1}")(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:
        x = max_pool_2x2(x)
    features = global_average_pool(x, self.dtype)
    logits = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32,
                      name="head")(features)
    if return_features:
      return logits, features
    return logits
