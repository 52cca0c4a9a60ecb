"""One client's local training of one round as a single traced program.

`make_client_update` returns a pure function that takes the global variables and one client's
arrays and runs all local epochs as one `lax.scan` over optimizer steps. The strategies in
`strategies.py` map it over clients (vmap, sharding, or a Python loop). The method supplies the
per-sample loss; this module knows no method by name.

Batching follows PyTorch's `DataLoader(shuffle=True, drop_last=False)`: every epoch visits the
client's samples in a fresh random order in `ceil(n_k / B)` batches, the last one partial. Batches
are a fixed size B for the compiler: the free places of a partial batch are filled with other samples
of the client and weigh 0 in the loss (they do enter BatchNorm's batch statistics). A client with
fewer samples than the largest one runs whole empty batches at the end of each epoch; those steps
leave the parameters and the optimizer state untouched.

On CPU the scan is fully unrolled by default (`fl.scan_unroll = 0`, "auto"): XLA's CPU backend runs
a convolution whose kernel is a loop-carried value about 16x slower inside a while loop than in
straight-line code (measured here: 10 SmallCNN steps, 4.1 s rolled, 0.26 s unrolled; no XLA flag
helped), at the price of a compile time that grows with the number of local steps.

Methods plug in through hooks (see `methods/base.py`): `init_local` (a local state carried through
the scan, e.g. an EMA teacher or per-sample label logits, whose `trainable` entry receives
gradients), `local_loss` (the per-sample loss of a `LocalBatch`), `penalty`, `update_local` (after
each optimizer step) and `local_output` (what goes back to the host after the round).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fednml_jax.engine import augment
from fednml_jax.losses import weighted_batch_mean


def steps_per_epoch(slots: int, batch_size: int) -> int:
  return -(-slots // batch_size)


def batch_plan(key, valid, count, local_epochs: int, batch_size: int):
  """Slot indices (E·S, B) and loss weights (E·S, B) for all local steps of one client."""
  slots = valid.shape[0]
  num_steps = steps_per_epoch(slots, batch_size)
  keys = jax.random.split(key, local_epochs)

  def epoch_order(k):
    # Real slots first, in random order; padding slots last.
    u = jnp.where(valid, jax.random.uniform(k, (slots,)), 2.0)
    return jnp.argsort(u)

  orders = jax.vmap(epoch_order)(keys)  # (E, slots)
  position = jnp.arange(num_steps * batch_size).reshape(num_steps, batch_size)
  wrapped = position % jnp.maximum(count, 1)
  slot = orders[:, wrapped]  # (E, S, B)
  weight = jnp.broadcast_to(position < count, slot.shape).astype(jnp.float32)
  return slot.reshape(-1, batch_size), weight.reshape(-1, batch_size)


def resolve_unroll(scan_unroll: int, total_steps: int):
  """`fl.scan_unroll`: 0 = auto (fully unrolled on CPU, rolled elsewhere), else that many steps."""
  if scan_unroll == 0:
    return True if jax.default_backend() == "cpu" else 1
  return True if scan_unroll >= total_steps else scan_unroll


class _Student:
  """The client's model in training mode at one local step. Each call updates the BatchNorm
  statistics (as each forward pass of a PyTorch model in `train()` mode does); the last ones are
  what the step keeps."""

  def __init__(self, model, params, batch_stats):
    self.model, self.params, self.batch_stats = model, params, batch_stats

  def apply(self, x):
    (logits, features), updates = self.model.apply(
        {"params": self.params, "batch_stats": self.batch_stats}, x, train=True,
        return_features=True, mutable=["batch_stats"])
    self.batch_stats = updates.get("batch_stats", self.batch_stats)
    return logits, features


@dataclasses.dataclass(frozen=True)
class ClientFrame:
  """One client's fixed inputs during a round, as every local hook of a method sees them (traced).

  `images`: the uint8 images (·, H, W, C) that `per_sample["image_index"]` points into: the whole
  training set in the `shared` image layout, the client's own (n_max, ...) block in the
  `per_client` one (`fl.image_layout`); `per_sample`: the client's (n_max, ...) arrays
  (`sample_index` into the training set, `image_index`, `valid`, and the method's); `client`: its
  per-client arrays;
  `count`: its number of samples; `global_vars`: the round's global model; `views`: the image
  views (`augment.Views`)."""

  model: Any
  views: Any
  images: Any
  per_sample: dict
  client: dict
  count: Any
  global_vars: Any
  scalars: dict
  batch_size: int

  def apply(self, variables, x):
    """`(logits, features)` of a model with `variables` in eval mode; no gradient flows back."""
    logits, features = self.model.apply(variables, x, train=False, return_features=True)
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(features)

  def teacher_logits(self, x):
    """The round's global model on `x` (eval mode, no gradient): the usual distillation teacher."""
    return self.apply(self.global_vars, x)[0]

  def predict_all(self, variables, view: str = "plain", key=None):
    """`(logits (n_max, C), features (n_max, D))` of `variables` (eval mode) on every slot of the
    client, `batch_size` images at a time, under the `plain` or `weak` view (padding slots hold
    some image of the client; mask them with `per_sample["valid"]`)."""
    index = self.per_sample["image_index"]
    n_max = index.shape[0]
    pad = (-n_max) % self.batch_size
    chunks = jnp.pad(index, (0, pad)).reshape(-1, self.batch_size)
    keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), chunks.shape[0])

    def one(args):
      idx, k = args
      raw = self.images[idx]
      x = self.views.weak(k, raw) if view == "weak" else self.views.plain(raw)
      return self.apply(variables, x)

    logits, features = jax.lax.map(one, (chunks, keys))
    return (logits.reshape((-1,) + logits.shape[2:])[:n_max],
            features.reshape((-1,) + features.shape[2:])[:n_max])


@dataclasses.dataclass(frozen=True)
class LocalBatch:
  """What a method's `local_loss` sees at one local step (traced).

  `raw_images` (B, H, W, C) uint8 and `batch` (the per-sample arrays at `slot`) are the step's
  batch; `weight` (B,) its loss weights (0 on padding); `local` the method's local state with the
  entry `trainable` (what gradients flow into besides the parameters); `key` the step's random key
  (the default weak view uses it as is: split or fold it for other draws); `student(x)` runs the
  model being trained (training mode) and returns `(logits, features)`."""

  frame: ClientFrame
  raw_images: Any
  batch: dict
  slot: Any
  weight: Any
  local: dict
  key: Any
  student: Callable[[Any], Any]

  def view(self, kind: str, key=None):
    """The batch under the `weak`, `strong` or `plain` view (`key` defaults to the step key)."""
    if kind == "plain":
      return self.frame.views.plain(self.raw_images)
    return getattr(self.frame.views, kind)(self.key if key is None else key, self.raw_images)


def make_client_update(*, model, method, phase, optimizer: optax.GradientTransformation,
                       local_epochs: int, batch_size: int, augment_cfg, image_mean,
                       image_std, scan_unroll: int = 0) -> Callable[..., Any]:
  """Builds `client_update(global_vars, images, client, scalars, key) -> (vars, mean_loss, output)`.

  `client` is a dict of one client's arrays: `per_sample` (n_max, ...) arrays including
  `sample_index`, `image_index` (into `images`: see `ClientFrame`) and `valid`, `per_client`
  arrays, and `count` (a scalar). `output` is the method's
  `local_output` (a pytree, `{}` by default), returned to the host after the round.
  """
  views = augment.Views(augment_cfg, image_mean, image_std)

  def client_update(global_vars, images, client, scalars, key):
    per_sample, per_client, count = client["per_sample"], client["per_client"], client["count"]
    plan_key, step_key, init_key = jax.random.split(key, 3)
    slots, weights = batch_plan(plan_key, per_sample["valid"], count, local_epochs, batch_size)
    num_steps = slots.shape[0]
    steps_in_epoch = num_steps // local_epochs
    step_keys = jax.random.split(step_key, num_steps)
    params = global_vars["params"]
    opt_state = optimizer.init(params)
    frame = ClientFrame(model=model, views=views, images=images, per_sample=per_sample,
                        client=per_client, count=count, global_vars=global_vars, scalars=scalars,
                        batch_size=batch_size)
    local = method.init_local(phase, frame, init_key)

    def step(carry, xs):
      params, batch_stats, opt_state, local = carry
      index, slot, weight, k = xs
      batch = {name: value[slot] for name, value in per_sample.items()}
      raw = images[batch["image_index"]]

      def loss_fn(p, trainable):
        student = _Student(model, p, batch_stats)
        ctx = LocalBatch(frame=frame, raw_images=raw, batch=batch, slot=slot, weight=weight,
                         local=dict(local, trainable=trainable), key=k, student=student.apply)
        per, aux = method.local_loss(phase, ctx)
        loss = weighted_batch_mean(per, weight)
        loss = loss + method.penalty(phase, params=p, global_params=global_vars["params"],
                                     client=per_client, scalars=scalars,
                                     epoch_step=index % steps_in_epoch)
        return loss, (student.batch_stats, aux)

      (loss, (new_stats, aux)), (grads, local_grads) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(params, local.get("trainable", {}))
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      nonempty = jnp.sum(weight) > 0
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(nonempty, n, o), new, old)  # noqa: E731
      new_params, new_stats = keep(new_params, params), keep(new_stats, batch_stats)
      new_local = method.update_local(
          phase, local, frame=frame, grads=local_grads, aux=aux, slot=slot, weight=weight,
          active=nonempty, epoch_end=(index + 1) % steps_in_epoch == 0, params=new_params,
          batch_stats=new_stats)
      carry = (new_params, new_stats, keep(new_opt_state, opt_state), new_local)
      return carry, (loss, nonempty)

    carry = (params, global_vars["batch_stats"], opt_state, local)
    steps = (jnp.arange(num_steps), slots, weights, step_keys)
    if num_steps == 1:
      # No one-trip loop: XLA:CPU keeps the gradient convolutions inside it in a layout it has no
      # fast kernel for (SmallCNN-32, 32 px, batch 32: 413 ms per client update, 20 ms without).
      carry, outputs = step(carry, jax.tree.map(lambda a: a[0], steps))
      outputs = jax.tree.map(lambda a: a[None], outputs)
    else:
      carry, outputs = jax.lax.scan(step, carry, steps,
                                    unroll=resolve_unroll(scan_unroll, num_steps))
    (params, batch_stats, _, local), (step_loss, nonempty) = carry, outputs
    mean_loss = jnp.sum(jnp.where(nonempty, step_loss, 0.0)) / jnp.maximum(jnp.sum(nonempty), 1)
    new_vars = {"params": params, "batch_stats": batch_stats}
    return new_vars, mean_loss, method.local_output(phase, local, frame=frame, variables=new_vars,
                                                    key=init_key)

  return client_update
