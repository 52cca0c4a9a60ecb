"""Forward passes of the global model over whole device-resident image sets, in fixed-size chunks."""

from __future__ import annotations

import jax
import numpy as np

from fednml_jax.engine import augment


def pad_to_multiple(images: np.ndarray, chunk: int) -> np.ndarray:
  """Pads the leading axis with zero images up to a multiple of `chunk` (one compiled shape)."""
  pad = (-len(images)) % chunk
  if pad:
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  return images


def make_predict(model, task, image_mean, image_std, chunk: int):
  """`predict(variables, images_uint8) -> probabilities` in eval mode, `chunk` images at a time.

  `images_uint8` must have a length that is a multiple of `chunk` (see `pad_to_multiple`).
  """

  @jax.jit
  def predict(variables, images):
    chunks = images.reshape((-1, chunk) + images.shape[1:])

    def one(raw):
      x = augment.normalise(raw, image_mean, image_std)
      return task.probabilities(model.apply(variables, x, train=False))

    probs = jax.lax.map(one, chunks)
    return probs.reshape((-1,) + probs.shape[2:])

  return predict


def make_predict_clients(model, task, image_mean, image_std, augment_cfg, with_features=False,
                         per_client_images=False):
  """`predict(variables, images, image_index, key) -> (K, n_max, C)` probabilities on every
  client's training samples, under the weak view (as the reference's refinement pass does), in one
  jitted call; the host pulls the result once. `image_index` (K, n_max) points into `images`: the
  whole set (N, H, W, C), or with `per_client_images` each client's block (K, n_max, H, W, C).
  With `with_features`, `(probabilities, (K, n_max, D) penultimate features)`."""

  @jax.jit
  def predict(variables, images, image_index, key):
    keys = jax.random.split(key, image_index.shape[0])

    def one_client(client_images, idx, k):
      x = augment.weak_view(k, client_images[idx], augment_cfg, image_mean, image_std)
      logits, features = model.apply(variables, x, train=False, return_features=True)
      probs = task.probabilities(logits)
      return (probs, features.astype(probs.dtype)) if with_features else probs

    if per_client_images:
      return jax.lax.map(lambda a: one_client(*a), (images, image_index, keys))
    return jax.lax.map(lambda a: one_client(images, *a), (image_index, keys))

  return predict
