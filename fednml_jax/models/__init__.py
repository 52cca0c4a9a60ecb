"""Image classifiers in flax.linen, and building them from a config.

Models (all `__call__(x, train, return_features=False)` on float (N, H, W, C) images that are
already normalised, returning logits (N, num_outputs), or `(logits, features)` with the pooled
penultimate features when `return_features=True`; the last layer is `nn.Dense` named `head`):

* `SmallCNN` (`name="small_cnn"`): a few conv-norm-ReLU-maxpool blocks, for fast CPU runs;
* `ResNet18` / `ResNet50` (`name="resnet18"` / `"resnet50"`): torchvision's ResNets (He et al.,
  "Deep Residual Learning for Image Recognition", CVPR 2016).

Every model takes `norm` in {"batch", "group"} and a compute `dtype` (parameters stay float32).
`init_variables` always returns `{'params': ..., 'batch_stats': ...}`, with an empty
`batch_stats` for GroupNorm models, so that variables of every model have the same two keys.
`load_pretrained` / `save_variables` read and write local weights files (see `weights`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fednml_jax.errors import ConfigError
from fednml_jax.models.cnn import SmallCNN
from fednml_jax.models.resnet import (NORMS, BasicBlock, Bottleneck, ResNet, ResNet18, ResNet50,
                                      check_norm, group_count)
from fednml_jax.models.weights import (LoadReport, flatten_variables, load_pretrained,
                                       merge_pretrained, read_weights_file, save_variables)

MODEL_NAMES = ("small_cnn", "resnet18", "resnet50")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_WIDTH = 32

__all__ = [
    "BasicBlock", "Bottleneck", "DTYPES", "LoadReport", "MODEL_NAMES", "NORMS", "ResNet",
    "ResNet18", "ResNet50", "SmallCNN", "build_model", "count_params", "cpu_slow_path_warning",
    "flatten_variables", "group_count", "init_variables", "load_pretrained", "merge_pretrained",
    "read_weights_file", "save_variables", "small_cnn_widths",
]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  if hasattr(cfg, "get"):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def small_cnn_widths(width: Any) -> tuple[int, ...]:
  """`SmallCNN` widths from `model.width`: an int w gives (w, 2w, 4w); a sequence is used as is."""
  if width is None:
    width = DEFAULT_WIDTH
  if isinstance(width, (int, np.integer)) and not isinstance(width, bool):
    widths = (int(width), 2 * int(width), 4 * int(width))
  elif isinstance(width, Sequence) and not isinstance(width, str) and width:
    widths = tuple(width)
  else:
    widths = ()
  if not widths or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0
                           for w in widths):
    raise ConfigError(
        f"model.width must be a positive int (the first block's channels; the next blocks double "
        f"it, e.g. 32 gives 32-64-128) or a non-empty list of positive ints (one per block), got "
        f"{width!r}.")
  return tuple(int(w) for w in widths)


def build_model(cfg: Any) -> nn.Module:
  """The model that the config `cfg` (a dict or ml_collections ConfigDict) describes.

  Keys: `name` ("small_cnn", "resnet18" or "resnet50"), `num_outputs` (labels per image),
  `norm` ("batch" or "group"; default "batch"), `dtype` ("float32" or "bfloat16"; default
  "float32"), `width` (small_cnn only; default 32, see `small_cnn_widths`) and
  `zero_init_residual` (ResNets only; default False). Other keys are ignored.
  """
  name = _get(cfg, "name")
  if not isinstance(name, str) or name.lower() not in MODEL_NAMES:
    raise ConfigError(
        f"model.name must be one of {', '.join(repr(n) for n in MODEL_NAMES)}, got {name!r}. "
        "Use 'small_cnn' for fast CPU runs and 'resnet18' or 'resnet50' for GPU experiments.")
  name = name.lower()
  num_outputs = _get(cfg, "num_outputs")
  if (not isinstance(num_outputs, (int, np.integer)) or isinstance(num_outputs, bool)
      or num_outputs < 1):
    raise ConfigError(
        f"model.num_outputs must be a positive int (the number of labels), got {num_outputs!r}.")
  num_outputs = int(num_outputs)
  norm = check_norm(_get(cfg, "norm", "batch") or "batch")
  dtype_name = _get(cfg, "dtype", "float32") or "float32"
  if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
    raise ConfigError(
        f"model.dtype must be one of {', '.join(repr(d) for d in DTYPES)}, got {dtype_name!r}. "
        "'bfloat16' computes in bfloat16 (mixed precision) and keeps parameters in float32.")
  dtype = DTYPES[dtype_name]
  if name == "small_cnn":
    return SmallCNN(num_outputs=num_outputs, widths=small_cnn_widths(_get(cfg, "width")),
                    norm=norm, dtype=dtype)
  zero_init_residual = bool(_get(cfg, "zero_init_residual", False))
  builder = ResNet18 if name == "resnet18" else ResNet50
  return builder(num_outputs, norm=norm, zero_init_residual=zero_init_residual, dtype=dtype)


def cpu_slow_path_warning(name: str, image_size: int) -> str | None:
  """Why model `name` at `image_size` px would run very slowly on XLA:CPU, or None.

  A ResNet's last stage works on (image_size / 32)-wide feature maps; where those are 2×2, XLA:CPU
  runs their 3×3 convolutions through an operand-swapped convolution with no fast kernel (about
  100× slower than on 3×3 or 4×4 maps; docs/performance.md)."""
  if name.lower().startswith("resnet") and -(-int(image_size) // 32) == 2:
    return (f"{name} at {image_size} px leaves 2x2 feature maps in its last stage, whose 3x3 "
            "convolutions XLA:CPU runs about 100x slower than at 96 px or more (measured: a "
            "round 12x slower than PyTorch's at 64 px). On CPU use images of 96 px or more, or "
            "model.name=small_cnn; GPUs are not affected.")
  return None


def init_variables(model: nn.Module, rng: Any, image_shape: Sequence[int]) -> dict[str, Any]:
  """Fresh variables `{'params': ..., 'batch_stats': ...}` of `model` for images of `image_shape`.

  `image_shape` is (H, W, C) (or (N, H, W, C), of which only H, W, C matter); `rng` is a PRNG key
  or an int seed. `batch_stats` is `{}` for models without BatchNorm.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) == 4:
    image_shape = image_shape[1:]
  if len(image_shape) != 3:
    raise ConfigError(f"image_shape must be (H, W, C), got {image_shape}.")
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.PRNGKey(int(rng))
  dummy = jnp.zeros((1,) + image_shape, jnp.float32)
  init = jax.jit(functools.partial(model.init, train=False))
  if jax.default_backend() == "cpu" and not isinstance(rng, jax.core.Tracer):
    # Initialisation runs once, but XLA:CPU spends seconds optimising its many random-number
    # kernels; unoptimised code gives the same values about twice as fast overall. (Under a
    # transformation such as `jax.eval_shape`, `rng` is a tracer and plain jit is used.)
    try:
      init = init.lower(rng, dummy).compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # pylint: disable=broad-except  # an option this XLA lacks: plain jit.
      pass
  variables = init(rng, dummy)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def count_params(tree: Any) -> int:
  """The number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s)."""
  leaves = jax.tree_util.tree_leaves(tree)
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in leaves))
