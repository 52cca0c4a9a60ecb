"""ResNet-18 and ResNet-50 in flax.linen, following torchvision's architecture.

The residual networks are those of He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016), laid out as torchvision's `torchvision.models.resnet` builds them:

* stem: 7x7 convolution with stride 2 and padding 3, normalisation, ReLU, 3x3 max-pool with
  stride 2 and padding 1;
* four stages of residual blocks with 64, 128, 256 and 512 base channels; stages 2-4 halve the
  resolution in their first block. ResNet-18 uses `BasicBlock` (two 3x3 convolutions) repeated
  [2, 2, 2, 2]; ResNet-50 uses `Bottleneck` (1x1, 3x3, 1x1 with expansion 4) repeated
  [3, 4, 6, 3], with the stride on the 3x3 convolution ("ResNet v1.5", as torchvision);
* a projection shortcut (1x1 convolution + normalisation) wherever the shape changes;
* global average pooling and a dense head `head` with `num_outputs` logits.

Convolutions have no bias and use He (fan-out, normal) initialisation; padding is explicit so
that outputs match PyTorch's for any input size. With `num_outputs=1000` the parameter counts
equal torchvision's (11,689,512 for ResNet-18, 25,557,032 for ResNet-50).

`norm="batch"` uses BatchNorm (momentum 0.9 in flax's convention, i.e. PyTorch's 0.1; epsilon
1e-5; running statistics in the `batch_stats` collection, used when `train=False`).
`norm="group"` uses GroupNorm with 32 groups, or the largest divisor of the channel count below
32 when it does not divide; GroupNorm has no running statistics, which suits federated training
on small, non-i.i.d. clients. Whatever the normalisation, the layers keep torchvision's names
(`conv1`, `bn1`, `layer1_0/conv1`, `layer2_0/downsample_conv`, `layer2_0/downsample_bn`, ...), so
converted torchvision weights map onto them one to one (see `fednml_jax.models.weights`).

`dtype` is the compute dtype (bfloat16 for mixed precision); parameters and batch statistics are
always float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fednml_jax.errors import ConfigError

NORMS = ("batch", "group")
MAX_GROUPS = 32

# He et al. initialisation as torchvision: normal, fan-out, gain sqrt(2).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_norm(norm: str) -> str:
  """Returns `norm` if it is a known normalisation, else raises `ConfigError`."""
  if norm not in NORMS:
    raise ConfigError(
        f"model.norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}. Use "
        "'batch' for BatchNorm (running statistics) or 'group' for GroupNorm (no running "
        "statistics).")
  return norm


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
  """The number of GroupNorm groups for `channels`: the largest divisor of it up to `max_groups`."""
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def norm_layer(norm: str, channels: int, train: bool, dtype: Any, name: str,
               scale_init: Callable[..., Any] = nn.initializers.ones) -> nn.Module:
  """A BatchNorm (PyTorch defaults) or GroupNorm layer over `channels` channels."""
  check_norm(norm)
  if norm == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, scale_init=scale_init, name=name)
  return nn.GroupNorm(num_groups=group_count(channels), epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, scale_init=scale_init, name=name)


def conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
  """A bias-free convolution padded like PyTorch's (`kernel // 2` on each side)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name)


def global_average_pool(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
  """Mean over the spatial axes of (N, H, W, C), reduced in float32 and returned in `dtype`."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  planes: int
  stride: int = 1
  norm: str = "batch"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out = conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
    out = norm_layer(self.norm, self.planes, train, self.dtype, "bn1")(out)
    out = nn.relu(out)
    out = conv(self.planes, 3, 1, self.dtype, "conv2")(out)
    out = norm_layer(self.norm, self.planes, train, self.dtype, "bn2", last_scale)(out)
    shortcut = _shortcut(x, self.planes * self.expansion, self.stride, self.norm, train,
                         self.dtype)
    return nn.relu(out + shortcut)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50+)."""

  planes: int
  stride: int = 1
  norm: str = "batch"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    out_channels = self.planes * self.expansion
    out = conv(self.planes, 1, 1, self.dtype, "conv1")(x)
    out = norm_layer(self.norm, self.planes, train, self.dtype, "bn1")(out)
    out = nn.relu(out)
    out = conv(self.planes, 3, self.stride, self.dtype, "conv2")(out)
    out = norm_layer(self.norm, self.planes, train, self.dtype, "bn2")(out)
    out = nn.relu(out)
    out = conv(out_channels, 1, 1, self.dtype, "conv3")(out)
    out = norm_layer(self.norm, out_channels, train, self.dtype, "bn3", last_scale)(out)
    shortcut = _shortcut(x, out_channels, self.stride, self.norm, train, self.dtype)
    return nn.relu(out + shortcut)


def _shortcut(x: jnp.ndarray, out_channels: int, stride: int, norm: str, train: bool,
              dtype: Any) -> jnp.ndarray:
  """The identity, or a 1x1 projection + norm when the stride or channel count changes.

  Called inside a block's compact `__call__`, so the layers become that block's submodules.
  """
  if stride == 1 and x.shape[-1] == out_channels:
    return x
  x = conv(out_channels, 1, stride, dtype, "downsample_conv")(x)
  return norm_layer(norm, out_channels, train, dtype, "downsample_bn")(x)


class ResNet(nn.Module):
  """A torchvision-style ResNet (He et al. 2016) for (N, H, W, C) float images.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: `BasicBlock` or `Bottleneck`.
    num_outputs: logits per image (the number of labels).
    norm: "batch" (BatchNorm) or "group" (GroupNorm).
    zero_init_residual: start each block's last norm scale at zero, so that every residual
      branch starts as the identity (torchvision's `zero_init_residual`).
    dtype: compute dtype; parameters stay float32.
  """

  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_outputs: int
  norm: str = "batch"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, return_features: bool = False):
    """Logits (N, num_outputs), or `(logits, features)` with the pooled (N, D) features.

    `x` is a float (N, H, W, C) batch that is already normalised; `train` selects batch
    statistics (and updates the running ones, when `batch_stats` is mutable) over the running
    averages. Logits and features are in the compute dtype.
    """
    check_norm(self.norm)
    x = jnp.asarray(x, self.dtype)
    x = conv(64, 7, 2, self.dtype, "conv1")(x)
    x = norm_layer(self.norm, 64, train, self.dtype, "bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      planes = 64 * 2 ** stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        x = self.block(planes=planes, stride=stride, norm=self.norm,
                       zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                       name=f"layer{stage + 1}_{index}")(x, train)
    features = global_average_pool(x, self.dtype)
    logits = nn.Dense(self.num_outputs, dtype=self.dtype, param_dtype=jnp.float32,
                      name="head")(features)
    if return_features:
      return logits, features
    return logits


def ResNet18(num_outputs: int, norm: str = "batch", zero_init_residual: bool = False,
             dtype: Any = jnp.float32) -> ResNet:
  """ResNet-18: `BasicBlock` x [2, 2, 2, 2], 512 features."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block=BasicBlock, num_outputs=num_outputs,
                norm=check_norm(norm), zero_init_residual=zero_init_residual, dtype=dtype)


def ResNet50(num_outputs: int, norm: str = "batch", zero_init_residual: bool = False,
             dtype: Any = jnp.float32) -> ResNet:
  """ResNet-50: `Bottleneck` x [3, 4, 6, 3], 2048 features."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block=Bottleneck, num_outputs=num_outputs,
                norm=check_norm(norm), zero_init_residual=zero_init_residual, dtype=dtype)
