"""Loss functions: pure, per-sample, jit-friendly.

Every loss returns one value per sample (shape `(B,)`); the engine takes the weighted mean over the
batch with the padding mask, so padded samples weigh 0 and a partial batch is averaged over its real
samples, as PyTorch's DataLoader without `drop_last` does.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def masked_bce_with_logits(logits, targets, class_mask):
  """Mean over the classes where `class_mask` is 1 of BCE-with-logits; shape (B,).

  `class_mask` is (C,) or (B, C). With an all-ones mask this is PyTorch's `BCEWithLogitsLoss`
  averaged over classes; with a client's annotated classes it is the reference's
  `criterion_(outputs, labels)[:, active_class_list].mean()` (the batch mean is the engine's).
  """
  per_entry = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                 targets.astype(jnp.float32))
  return masked_class_mean(per_entry, class_mask)


def masked_class_mean(per_entry, class_mask):
  """Mean over the last axis of `per_entry` (B, C) where `class_mask` ((C,) or (B, C)) is 1, 0 for
  a row with no class in the mask; shape (B,)."""
  mask = jnp.broadcast_to(class_mask, per_entry.shape).astype(jnp.float32)
  return jnp.sum(per_entry * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def softmax_cross_entropy(logits, targets):
  """Cross-entropy `−Σ_c t_c·log softmax(z)_c` per sample; shape (B,). `targets` (B, C) are one-hot
  or soft (rows on the simplex); with one-hot targets this is PyTorch's `CrossEntropyLoss` per
  sample."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def weighted_batch_mean(per_sample, weight):
  """Σ w_i·ℓ_i / Σ w_i, and 0 for a batch whose weights are all 0 (an all-padding batch)."""
  weight = weight.astype(jnp.float32)
  return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1.0)
