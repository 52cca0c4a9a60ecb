"""On-device image augmentation and normalisation (jit- and vmap-friendly).

The weak view is the reference's `RandomAffine(degrees=10, translate=(0.02, 0.02))` +
`RandomHorizontalFlip()`: each image gets its own rotation angle, shift and flip, applied by inverse
mapping with bilinear interpolation and zero fill, as torchvision does. Images stay uint8 on the
device until they are augmented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy import ndimage


def normalise(images_uint8, mean, std):
  """uint8 (…, H, W, C) → float32 standardised with the dataset's per-channel mean and std."""
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def _affine_one(key, image, max_degrees, max_translate, hflip):
  """One (H, W, C) float image under a random rotation, translation and horizontal flip."""
  h, w, _ = image.shape
  k_angle, k_shift, k_flip = jax.random.split(key, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (), minval=-max_degrees, maxval=max_degrees))
  # torchvision draws an integer pixel shift in [-t·size, t·size]; a continuous shift is as good.
  shift = jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0) * max_translate * jnp.array(
      [h, w], jnp.float32)
  flip = jnp.logical_and(hflip, jax.random.bernoulli(k_flip))
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  # Output pixel p reads the source at R^{-1}(p - c - t) + c.
  dy, dx = yy - cy - shift[0], xx - cx - shift[1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_y = cos * dy - sin * dx + cy
  src_x = sin * dy + cos * dx + cx
  src_x = jnp.where(flip, (w - 1) - src_x, src_x)

  def sample(channel):
    return ndimage.map_coordinates(channel, [src_y, src_x], order=1, mode="constant", cval=0.0)

  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def weak_augment(key, images, max_degrees: float, max_translate: float, hflip: bool):
  """A batch (B, H, W, C) of float images, each under its own random affine map and flip."""
  if max_degrees == 0 and max_translate == 0 and not hflip:
    return images
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _affine_one(k, x, max_degrees, max_translate, hflip))(keys, images)


def weak_view(key, raw_images, augment_cfg, mean, std):
  """The training view of uint8 images: scaled to [0, 1], weakly augmented (`augment_cfg`:
  rotation_degrees, translate, hflip), then standardised. Local training and FedNML's refinement
  pass both use it, so they see the same view."""
  x = raw_images.astype(jnp.float32) / 255.0
  x = weak_augment(key, x, augment_cfg.rotation_degrees, augment_cfg.translate, augment_cfg.hflip)
  return (x - mean) / std
