"""On-device image augmentation and normalisation (jit- and vmap-friendly).

The weak view is the reference's `RandomAffine(degrees=10, translate=(0.02, 0.02))` +
`RandomHorizontalFlip()`: each image gets its own rotation angle, shift and flip, applied by inverse
mapping with bilinear interpolation and zero fill, as torchvision does. The strong view is FedLSM's
(flips, brightness, blur or noise, shift-scale-rotate), for methods that train on two views. Images stay uint8 on the
device until they are augmented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalise(images_uint8, mean, std):
  """uint8 (…, H, W, C) → float32 standardised with the dataset's per-channel mean and std."""
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def _affine_one(image, angle_deg, shift_frac, scale, hflip, vflip):
  """One (H, W, C) image under a rotation by `angle_deg`, a shift by `shift_frac`·(H, W), a zoom
  by `scale` (about the centre) and optional flips, by inverse mapping with bilinear
  interpolation and zero fill (torchvision's and albumentations' `border_mode=0`); float32, in the
  image's own scale (a uint8 image is read as its values 0–255)."""
  h, w, _ = image.shape
  angle = jnp.deg2rad(angle_deg)
  shift = shift_frac * jnp.array([h, w], jnp.float32)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  # Output pixel p = (y, x) reads the source at R^{-1}(p - c - t)/s + c (then flipped): an affine
  # map of (y, x, 1), applied to all pixels as one matrix product, so that the coordinates are
  # materialised once (XLA:CPU otherwise recomputes the angle's cosine and sine for every element
  # of every operation that reads them).
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  oy, ox = cy + shift[0], cx + shift[1]
  rows = jnp.stack([jnp.stack([cos, -sin, cy - cos * oy + sin * ox]),
                    jnp.stack([sin, cos, cx - sin * oy - cos * ox])])
  flipped = jnp.array([[0.0, 0.0, h - 1.0], [0.0, 0.0, w - 1.0]]) - rows
  rows = jnp.where(jnp.stack([vflip, hflip])[:, None], flipped, rows)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  grid = jnp.stack([yy.ravel(), xx.ravel(), jnp.ones(h * w, jnp.float32)])
  src = jnp.dot(rows, grid, precision=jax.lax.Precision.HIGHEST).reshape(2, h, w)
  return bilinear_sample(image, src[0], src[1])


def bilinear_sample(image, src_y, src_x):
  """(H', W', C) samples of an (H, W, C) image at the float coordinates `src_y`, `src_x` (H', W'):
  bilinear, zero outside the image. The same arithmetic, in the same order, as
  `jax.scipy.ndimage.map_coordinates(channel, [src_y, src_x], order=1, mode="constant")` on each
  channel, so the result is bit-identical to it (for finite images), but with one gather: the
  image, padded with a zero row and column on each side, is laid out with each pixel's 2×2
  neighbourhood side by side (H+1, W+1, 4·C), and one row of that is read per output pixel. A
  corner outside the image gets weight 0. (XLA:CPU's gathers cost per element read and per index,
  so one gather of 4·C-wide rows beats four of C-wide rows, or one per channel and corner.)"""
  h, w, c = image.shape
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
  taps = jnp.concatenate([padded[dy:dy + h + 1, dx:dx + w + 1] for dy in (0, 1) for dx in (0, 1)],
                         axis=-1)  # (H+1, W+1, 4C): corners (y, x), (y, x+1), (y+1, x), (y+1, x+1)
  lower_y, lower_x = jnp.floor(src_y), jnp.floor(src_x)
  upper_wy, upper_wx = src_y - lower_y, src_x - lower_x
  iy, ix = lower_y.astype(jnp.int32), lower_x.astype(jnp.int32)
  weights = []
  for y, wy in ((iy, 1 - upper_wy), (iy + 1, upper_wy)):
    for x, wx in ((ix, 1 - upper_wx), (ix + 1, upper_wx)):
      inside = (0 <= y) & (y < h) & (0 <= x) & (x < w)
      weights.append(jnp.where(inside, wy * wx, 0.0))
  # Row iy + 1 of the padded image is row iy of the image; where a whole 2×2 neighbourhood is
  # outside the image its weights are 0, so any row will do there.
  pixels = taps[jnp.clip(iy + 1, 0, h), jnp.clip(ix + 1, 0, w)]  # (H', W', 4C)
  pixels = pixels.astype(jnp.float32)
  out = weights[0][..., None] * pixels[..., :c]
  for corner in range(1, 4):
    out = out + weights[corner][..., None] * pixels[..., corner * c:(corner + 1) * c]
  return out


def _uniform(key, limit, shape=()):
  return jax.random.uniform(key, shape, minval=-limit, maxval=limit)


def weak_augment(key, images, max_degrees: float, max_translate: float, hflip: bool):
  """A batch (B, H, W, C) of images (uint8 or float), each under its own random rotation in
  ±max_degrees, shift in ±max_translate of the size (torchvision draws an integer pixel shift; a
  continuous one is as good) and, when `hflip`, a horizontal flip with probability 1/2; float32,
  in the images' own scale. Sampling uint8 images and scaling afterwards is cheaper on CPU than
  scaling first: the gather then reads a quarter of the bytes."""
  if max_degrees == 0 and max_translate == 0 and not hflip:
    return images.astype(jnp.float32)

  def one(k, x):
    k_angle, k_shift, k_flip = jax.random.split(k, 3)
    flip = jnp.logical_and(hflip, jax.random.bernoulli(k_flip))
    return _affine_one(x, _uniform(k_angle, max_degrees), _uniform(k_shift, max_translate, (2,)),
                       1.0, flip, False)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def _gaussian_blur(image, sigma):
  """(H, W, C) image blurred by a 5-tap Gaussian of standard deviation `sigma` (edge-padded)."""
  taps = jnp.arange(-2.0, 3.0)
  kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  padded = jnp.pad(image, ((2, 2), (2, 2), (0, 0)), mode="edge")
  h, w, _ = image.shape
  rows = sum(kernel[i] * padded[i:i + h] for i in range(5))
  return sum(kernel[i] * rows[:, i:i + w] for i in range(5))


def strong_augment(key, images):
  """FedLSM's strong view (its albumentations pipeline) on a batch (B, H, W, C) of [0, 1] images:
  vertical and horizontal flips (p = 1/2 each); brightness shifted by U(−0.2, 0.2) (p = 0.75); one
  of Gaussian blur (σ ∈ U(0.3, 1.1), a 5-tap kernel; it also stands in for the median blur) or
  Gaussian noise (variance U(5, 30) on the 0–255 scale), p = 0.7; shift ±0.1, zoom 1 ± 0.1 and
  rotation ±15° with zero border (p = 0.85)."""

  def one(k, x):
    ks = jax.random.split(k, 12)
    hflip, vflip = jax.random.bernoulli(ks[0]), jax.random.bernoulli(ks[1])
    bright = jnp.where(jax.random.bernoulli(ks[2], 0.75), _uniform(ks[3], 0.2), 0.0)
    x = jnp.clip(x + bright, 0.0, 1.0)
    blurred = _gaussian_blur(x, jax.random.uniform(ks[4], minval=0.3, maxval=1.1))
    noise_std = jnp.sqrt(jax.random.uniform(ks[5], minval=5.0, maxval=30.0)) / 255.0
    noisy = jnp.clip(x + noise_std * jax.random.normal(ks[6], x.shape), 0.0, 1.0)
    degraded = jnp.where(jax.random.bernoulli(ks[7]), blurred, noisy)
    x = jnp.where(jax.random.bernoulli(ks[8], 0.7), degraded, x)
    move = jax.random.bernoulli(ks[9], 0.85)
    angle = jnp.where(move, _uniform(ks[10], 15.0), 0.0)
    shift_scale = jnp.where(move, _uniform(ks[11], 0.1, (3,)), 0.0)
    return _affine_one(x, angle, shift_scale[:2], 1.0 + shift_scale[2], hflip, vflip)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def weak_view(key, raw_images, augment_cfg, mean, std):
  """The training view of uint8 images: weakly augmented (`augment_cfg`: rotation_degrees,
  translate, hflip), scaled to [0, 1], then standardised. Local training and FedNML's refinement
  pass both use it, so they see the same view."""
  x = weak_augment(key, raw_images, augment_cfg.rotation_degrees, augment_cfg.translate,
                   augment_cfg.hflip)
  return (x / 255.0 - mean) / std


class Views:
  """The views of a batch of uint8 images a method may train on, standardised with the dataset's
  channel statistics: `weak` (the reference's training transform, `weak_view`), `strong`
  (`strong_augment`) and `plain` (no augmentation)."""

  def __init__(self, augment_cfg, mean, std):
    self.augment_cfg, self.mean, self.std = augment_cfg, mean, std

  def weak(self, key, raw_images):
    return weak_view(key, raw_images, self.augment_cfg, self.mean, self.std)

  def strong(self, key, raw_images):
    x = strong_augment(key, raw_images.astype(jnp.float32) / 255.0)
    return (x - self.mean) / self.std

  def plain(self, raw_images):
    return normalise(raw_images, self.mean, self.std)
