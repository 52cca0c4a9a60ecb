"""The federated engine: batching semantics, strategies agreeing, compile-once, aggregation."""

import json
from concurrent import futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fednml_jax import aggregation, train
from fednml_jax.engine import augment, compile_ahead, local_training, strategies
from fednml_jax.engine.clients import ClientLayout
from fednml_jax.methods.fedavg import FedAvg

from conftest import tiny_config


def test_batch_plan_visits_each_sample_once_per_epoch_and_pads_with_zero_weight():
  valid = jnp.array([True] * 5 + [False] * 3)  # 5 real samples, 3 padding slots
  slots, weights = local_training.batch_plan(jax.random.PRNGKey(0), valid, 5, local_epochs=2,
                                             batch_size=2)
  # ceil(8 / 2) = 4 steps per epoch: [2, 2, 1 real + 1 filler, 0 real + 2 fillers].
  assert slots.shape == (8, 2) and weights.shape == (8, 2)
  np.testing.assert_array_equal(np.asarray(weights[:4]), [[1, 1], [1, 1], [1, 0], [0, 0]])
  for epoch in range(2):
    s = np.asarray(slots[4 * epoch:4 * epoch + 4])
    w = np.asarray(weights[4 * epoch:4 * epoch + 4])
    assert sorted(s[w > 0].tolist()) == [0, 1, 2, 3, 4]  # each real sample exactly once
    assert (s < 5).all()  # fillers are real samples too, never padding slots
  # Epoch orders differ.
  assert not np.array_equal(np.asarray(slots[:2]), np.asarray(slots[4:6]))


def test_weighted_mean_by_hand():
  stacked = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]])}
  # weights 1, 3 and a padding client of weight 0: (1·[1,2] + 3·[3,6]) / 4 = [2.5, 5].
  out = aggregation.weighted_mean(stacked, jnp.array([1.0, 3.0, 0.0]))
  np.testing.assert_allclose(out["w"], [2.5, 5.0])
  np.testing.assert_array_equal(aggregation.client_weights(jnp.array([10, 30, 0]), "uniform"),
                                [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(
      aggregation.client_weights(jnp.array([10, 30, 0]), "sample_count"), [10.0, 30.0, 0.0])


def test_client_layout_pads_samples_and_clients():
  layout = ClientLayout.from_indices([np.array([4, 7, 9]), np.array([1, 2])], pad_clients_to=4)
  assert layout.num_clients == 4 and layout.num_real_clients == 2 and layout.slots == 3
  np.testing.assert_array_equal(layout.counts, [3, 2, 0, 0])
  np.testing.assert_array_equal(layout.valid[1], [True, True, False])
  per_image = np.arange(10) * 10
  np.testing.assert_array_equal(layout.gather(per_image, fill=-1)[:2], [[40, 70, 90], [10, 20, -1]])


def _one_round(strategy):
  """Global variables after one round, from the same start, under `strategy`."""
  experiment = train.Experiment(tiny_config(**{"fl.strategy": strategy}))
  variables = experiment.initial_variables()
  state = experiment.method.init_state()
  new_variables, _, records = experiment.run_round(0, variables, state)
  return new_variables, records[-1]["client_loss"]


@pytest.mark.parametrize("backend,devices,expected", [
    ("cpu", 1, "loop"), ("cpu", 2, "loop"), ("gpu", 1, "loop"), ("gpu", 8, "shard"),
    ("tpu", 4, "shard")])
def test_auto_strategy_loops_on_one_device_and_shards_over_several_accelerators(
    monkeypatch, backend, devices, expected):
  """`auto` never vmaps clients on one device: vmapped per-client convolutions become grouped
  convolutions, 9× slower on an H100 at the paper's configuration (docs/performance.md)."""
  monkeypatch.setattr(strategies.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(strategies.jax, "device_count", lambda: devices)
  assert strategies.resolve_strategy("auto") == expected
  assert strategies.resolve_strategy("vmap") == "vmap"  # an explicit choice is kept


@pytest.mark.parametrize("strategy", ["vmap", "shard"])
def test_strategies_agree_with_loop(strategy):
  """vmap (one program) and shard (3 clients + 1 padding client over 2 devices) compute the
  same round as the loop, up to float32 reassociation."""
  assert jax.device_count() == 2, "conftest sets two CPU devices"
  loop_vars, loop_losses = _one_round("loop")
  other_vars, other_losses = _one_round(strategy)
  assert len(other_losses) == 3  # the padding client is not reported
  np.testing.assert_allclose(other_losses, loop_losses, rtol=1e-4)
  # Per tensor, relative L2 distance: Adam turns reassociation noise in near-zero gradients into
  # steps of up to ~lr on single entries, so elementwise tolerances would be arbitrary; a real
  # fault (e.g. the padding client weighing 1/4) moves whole tensors by far more than 1e-3.
  for a, b in zip(jax.tree.leaves(loop_vars), jax.tree.leaves(other_vars)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-3 * max(np.linalg.norm(a), 1.0)


@pytest.mark.parametrize("strategy,grouped", [("shard", False), ("vmap", True)])
def test_shard_loops_over_each_device_s_clients_instead_of_grouping_their_convolutions(
    strategy, grouped):
  """With more clients than devices (4 over 2), `shard` trains each device's clients one after
  another: its compiled round has no grouped convolution, which vmapped clients become."""
  experiment = train.Experiment(tiny_config(**{"fl.strategy": strategy, "fl.num_clients": 4,
                                                "fl.scan_unroll": 1}))  # a rolled scan: faster
  variables, state = experiment.initial_variables(), experiment.method.init_state()
  inputs = experiment.prepare_round(0, variables, state)
  compiled = experiment.program_for(inputs.phase)._round.jitted.lower(
      variables, experiment.train_images, inputs.clients, inputs.scalars,
      inputs.round_key).compile().as_text()
  assert ("feature_group_count" in compiled) == grouped


def test_clients_in_turn_are_unrolled_on_cpu_up_to_a_limit():
  """On CPU `map_in_turn` unrolls (XLA:CPU's convolution gradients are slow inside loops) up to
  `MAX_UNROLLED_ON_CPU` items, then keeps the loop (compile time); both compute `lax.map`."""
  assert jax.default_backend() == "cpu"
  for length, looped in ((3, False), (strategies.MAX_UNROLLED_ON_CPU + 1, True)):
    xs = {"a": jnp.arange(length, dtype=jnp.float32), "b": jnp.ones((length, 2))}
    fn = lambda x: (x["a"] * 2.0, x["b"].sum())  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda xs: strategies.map_in_turn(fn, xs, length))(xs))
    assert ("scan" in jaxpr) == looped
    out = strategies.map_in_turn(fn, xs, length)
    np.testing.assert_array_equal(out[0], 2.0 * np.arange(length))
    np.testing.assert_array_equal(out[1], np.full(length, 2.0))


def test_a_program_compiled_ahead_is_the_one_its_call_runs():
  traces = []

  def f(x, scale):
    traces.append(x.shape)
    return jnp.sin(x) * scale

  program = compile_ahead.AheadOfTime(f)
  x = jnp.arange(6.0)
  with futures.ThreadPoolExecutor(1) as executor:
    future = program.compile_in(executor, x, np.float32(2.0))
    assert program.compile_in(executor, x + 1, np.float32(3.0)) is future  # same signature
    future.result()
  assert traces == [(6,)]
  np.testing.assert_allclose(program(x, np.float32(2.0)), np.sin(np.arange(6.0)) * 2, rtol=1e-6)
  assert traces == [(6,)]  # the call ran the executable compiled ahead
  program(jnp.arange(4.0), np.float32(2.0))  # another signature: compiled at the call
  assert traces == [(6,), (4,)]
  with jax.default_matmul_precision("highest"):  # a thread-local setting: not the same program
    program(x, np.float32(2.0))
    assert len(traces) == 3
    with futures.ThreadPoolExecutor(1) as executor:  # whose thread does not see that setting
      assert program.compile_in(executor, jnp.arange(5.0), np.float32(2.0)).result() is None
    program(jnp.arange(5.0), np.float32(2.0))
    assert traces[3:] == [(5,)]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_later_phases_compile_ahead_and_their_rounds_do_not_compile_again(
    tmp_path, monkeypatch, strategy):
  """After round 0, FedNML's refinement phase (rounds 2 on) compiles in the background; its rounds
  run that program: each phase's round program is traced once."""
  calls = []
  real = train.Experiment.compile_ahead

  def spy(self, executor, from_round, *args):
    calls.append((from_round, real(self, executor, from_round, *args)))
    return calls[-1][1]

  monkeypatch.setattr(train.Experiment, "compile_ahead", spy)
  config = tiny_config(method="fednml", rounds=3, **{
      "fl.strategy": strategy, "fl.scan_unroll": 1, "fednml.warmup_rounds": 2,
      "fednml.refine_every": 1})
  summary = train.train_and_evaluate(config, str(tmp_path))
  [(from_round, jobs)] = calls
  assert from_round == 1 and len(jobs) == 1  # the refinement phase's program
  assert jobs[0].done() and jobs[0].exception() is None
  per_phase = 2 if strategy == "loop" else 1  # the loop's client program and aggregation
  assert summary["compiled_programs"] == 2 * per_phase


def test_programs_compile_once_per_run(tmp_path):
  """Rounds reuse the compiled program: the trace count does not grow with the number of rounds."""
  short = train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path / "one"))
  long = train.train_and_evaluate(tiny_config(rounds=3), str(tmp_path / "three"))
  assert short["compiled_programs"] == long["compiled_programs"]


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
  a = train.train_and_evaluate(tiny_config(), str(tmp_path / "a"))
  b = train.train_and_evaluate(tiny_config(), str(tmp_path / "b"))
  c = train.train_and_evaluate(tiny_config(seed=1), str(tmp_path / "c"))
  assert a["test_final"] == b["test_final"]
  assert a["test_final"] != c["test_final"]


class _ProbeMethod(FedAvg):
  """FedAvg plus a per-sample trainable offset in the loss, counters in the local state and the
  client's logits on all its slots as its local output: exercises every local hook."""

  name = "fedavg"  # runs in FedAvg's config; the probe is swapped in after construction

  def __init__(self, config, setup):
    super().__init__(config, setup)
    self.seen = []

  def init_local(self, phase, frame, key):
    slots = frame.per_sample["valid"].shape[0]
    return {"trainable": jnp.zeros(slots), "grad_sum": jnp.zeros(slots),
            "epochs": jnp.int32(0), "active_steps": jnp.int32(0)}

  def local_loss(self, phase, ctx):
    per_sample, aux = super().local_loss(phase, ctx)
    return per_sample + ctx.local["trainable"][ctx.slot], aux

  def update_local(self, phase, local, *, grads, active, epoch_end, **unused):
    return dict(local, grad_sum=local["grad_sum"] + grads, epochs=local["epochs"] + epoch_end,
                active_steps=local["active_steps"] + active)

  def local_output(self, phase, local, *, frame, variables, key):
    logits, features = frame.predict_all(variables)
    return {"grad_sum": local["grad_sum"], "epochs": local["epochs"],
            "active_steps": local["active_steps"], "logits": logits, "features": features}

  def after_round(self, rnd, state, outputs):
    self.seen.append(outputs)
    return state, False, {"probe_round": rnd}


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_local_hooks_carry_state_gradients_and_outputs(strategy):
  config = tiny_config(**{"fl.strategy": strategy, "fl.local_epochs": 2})
  experiment = train.Experiment(config)
  probe = experiment.method = _ProbeMethod(config, experiment.setup)
  variables = experiment.initial_variables()
  new_variables, _, records = experiment.run_round(0, variables, probe.init_state())
  assert records[-1] == {"round": 0, "split": "train", "kind": "after_round", "probe_round": 0}
  out = probe.seen[0]
  layout = experiment.layout
  batch = config.fl.batch_size
  for k in range(layout.num_real_clients):
    steps = -(-int(layout.counts[k]) // batch)  # non-empty steps per epoch: ceil(n_k / B)
    assert int(out["epochs"][k]) == 2 and int(out["active_steps"][k]) == 2 * steps
    # d(Σ w·(ℓ + t[slot]) / Σ w)/dt sums to 1 over each non-empty batch, 0 on padding slots.
    grad_sum = out["grad_sum"][k]
    np.testing.assert_allclose(grad_sum.sum(), 2 * steps, rtol=1e-5)
    assert np.all(grad_sum[~layout.valid[k]] == 0) and np.all(grad_sum[layout.valid[k]] > 0)
  # `predict_all` is client k's own model in eval mode on its slots (plain view).
  client_vars = jax.tree.map(lambda a: a[1], experiment.program_for("train")(
      variables, experiment.train_images, experiment._clients, {},
      jax.random.fold_in(jax.random.fold_in(experiment.run_key, train.STREAM_TRAIN), 0))[2])
  images = experiment.dataset.train.images[layout.sample_index[1][layout.valid[1]]]
  x = augment.normalise(jnp.asarray(images), experiment.image_mean, experiment.image_std)
  expected = experiment.model.apply(client_vars, x, train=False)
  np.testing.assert_allclose(out["logits"][1][layout.valid[1]], expected, rtol=1e-4, atol=1e-5)
  assert out["features"].shape[:2] == out["logits"].shape[:2]
  assert jax.tree.leaves(new_variables)


def _primitive_names(jaxpr) -> set:
  """The primitives of a (closed) jaxpr and of every jaxpr nested in its equations."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          names |= _primitive_names(sub)
  return names


@pytest.mark.parametrize("batch_size, steps", [(64, 1), (16, 4)])
def test_a_single_local_step_runs_without_a_loop(batch_size, steps):
  """One local step is straight-line code (XLA:CPU runs the gradient convolutions of a one-trip
  loop about 20x slower); several steps are a scan."""
  experiment = train.Experiment(tiny_config(**{"fl.strategy": "loop",
                                               "fl.batch_size": batch_size}))
  assert -(-int(experiment.layout.counts.max()) // batch_size) == steps
  variables = experiment.initial_variables()
  inputs = experiment.prepare_round(0, variables, experiment.method.init_state())
  client = jax.tree.map(lambda a: a[0], inputs.clients)
  jaxpr = jax.make_jaxpr(experiment.program_for(inputs.phase)._client)(
      variables, experiment.train_images, client, inputs.scalars, inputs.round_key)
  assert ("scan" in _primitive_names(jaxpr)) == (steps > 1)
  assert "conv_general_dilated" in _primitive_names(jaxpr)


class _EpochStepPenalty(FedAvg):
  """FedAvg plus a parameter-free penalty equal to the step's index within its local epoch: it adds
  to the reported loss without changing training."""

  name = "fedavg"

  def penalty(self, phase, *, params, global_params, client, scalars, epoch_step):
    return epoch_step.astype(jnp.float32)


def test_penalty_sees_the_step_index_within_the_local_epoch():
  # Two epochs: the index restarts at 0 in each (a global step index would add (2s − 1) / 2).
  config = tiny_config(**{"fl.strategy": "loop", "fl.local_epochs": 2})
  losses = []
  for method_class in (FedAvg, _EpochStepPenalty):
    experiment = train.Experiment(config)
    method = experiment.method = method_class(config, experiment.setup)
    _, _, records = experiment.run_round(0, experiment.initial_variables(), method.init_state())
    losses.append(np.array(next(r["client_loss"] for r in records if "client_loss" in r)))
  layout = experiment.layout
  # A client's non-empty steps are 0 … s−1 of each epoch (s = ceil(n_k / B)): the mean loss it
  # reports grows by the mean index (s − 1) / 2.
  steps = -(-layout.counts[:layout.num_real_clients] // config.fl.batch_size)
  np.testing.assert_allclose(losses[1] - losses[0], (steps - 1) / 2, rtol=1e-5, atol=1e-5)


def test_strong_view_is_random_per_image_and_stays_in_range():
  raw = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3)), jnp.uint8)
  x = raw.astype(jnp.float32) / 255.0
  a = augment.strong_augment(jax.random.PRNGKey(0), x)
  b = augment.strong_augment(jax.random.PRNGKey(0), x)
  c = augment.strong_augment(jax.random.PRNGKey(1), x)
  assert a.shape == x.shape
  np.testing.assert_array_equal(a, b)  # a function of the key
  assert not np.allclose(a, c) and not np.allclose(a, x)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 + 1e-6
  # With every random choice off, the affine map is the identity.
  same = augment._affine_one(x[0], 0.0, jnp.zeros(2), 1.0, False, False)
  np.testing.assert_allclose(same, x[0], atol=1e-5)
  flipped = augment._affine_one(x[0], 0.0, jnp.zeros(2), 1.0, False, True)
  np.testing.assert_allclose(flipped, x[0][::-1], atol=1e-5)


def test_affine_map_rotates_shifts_zooms_and_flips_about_the_centre():
  # The source coordinates of each output pixel, written out: R^{-1}(p - c - t)/s + c, flipped.
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((12, 10, 3)), jnp.float32)
  h, w = 12, 10
  yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  for angle, shift, scale, hflip, vflip in ((7.0, (0.1, -0.05), 1.1, False, False),
                                            (-12.0, (0.0, 0.2), 0.9, True, False),
                                            (30.0, (-0.1, 0.0), 1.0, True, True)):
    a = np.deg2rad(angle)
    dy = (yy - (h - 1) / 2 - shift[0] * h) / scale
    dx = (xx - (w - 1) / 2 - shift[1] * w) / scale
    src_y = np.cos(a) * dy - np.sin(a) * dx + (h - 1) / 2
    src_x = np.sin(a) * dy + np.cos(a) * dx + (w - 1) / 2
    src_x = (w - 1) - src_x if hflip else src_x
    src_y = (h - 1) - src_y if vflip else src_y
    expected = augment.bilinear_sample(image, jnp.asarray(src_y, jnp.float32),
                                       jnp.asarray(src_x, jnp.float32))
    got = augment._affine_one(image, angle, jnp.asarray(shift), scale, hflip, vflip)
    np.testing.assert_allclose(got, expected, atol=1e-4)
  # A quarter turn about the centre of a square image, by hand: output (y, x) reads source
  # (c - (x - c), c + (y - c)) = (3 - x, y) for c = 1.5.
  square = jnp.arange(16.0).reshape(4, 4, 1)
  turned = augment._affine_one(square, 90.0, jnp.zeros(2), 1.0, False, False)[..., 0]
  np.testing.assert_allclose(turned, square[..., 0].T[:, ::-1], atol=1e-4)


def test_bilinear_sample_by_hand_and_as_map_coordinates():
  # A 2x2 image with channels (v, 10v): the centre is the mean; half a pixel outside the right
  # edge keeps half of the edge pixels (zero fill); an integer coordinate is that pixel.
  image = jnp.asarray([[[0.0, 0.0], [2.0, 20.0]], [[4.0, 40.0], [6.0, 60.0]]])
  ys, xs = jnp.asarray([[0.5, 0.5, 1.0]]), jnp.asarray([[0.5, 1.5, 0.0]])
  np.testing.assert_allclose(augment.bilinear_sample(image, ys, xs),
                             [[[3.0, 30.0], [2.0, 20.0], [4.0, 40.0]]])
  # The same numbers, bit for bit, as jax.scipy's map_coordinates on each channel.
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.random((9, 7, 3)), jnp.float32)
  ys = jnp.asarray(rng.uniform(-2, 10, (5, 6)), jnp.float32)
  xs = jnp.asarray(rng.uniform(-2, 8, (5, 6)), jnp.float32)
  per_channel = jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], [ys, xs], order=1,
                                                             mode="constant", cval=0.0)
                           for c in range(3)], axis=-1)
  np.testing.assert_array_equal(jax.jit(augment.bilinear_sample)(image, ys, xs),
                                jax.jit(lambda: per_channel)())
  # A uint8 image is sampled as its values (float32), likewise bit for bit.
  raw = jnp.asarray(rng.integers(0, 256, (9, 7, 3)), jnp.uint8)
  per_channel = jnp.stack([jax.scipy.ndimage.map_coordinates(
      raw[..., c].astype(jnp.float32), [ys, xs], order=1, mode="constant", cval=0.0)
      for c in range(3)], axis=-1)
  sampled = jax.jit(augment.bilinear_sample)(raw, ys, xs)
  assert sampled.dtype == jnp.float32
  np.testing.assert_array_equal(sampled, jax.jit(lambda: per_channel)())


def test_weak_view_samples_uint8_then_scales_as_scaling_first():
  # weak_view augments the uint8 images and scales to [0, 1] afterwards (cheaper on CPU); that is
  # the view of the [0, 1] images up to float rounding.
  raw = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
  cfg = ml_collections.ConfigDict({"rotation_degrees": 10.0, "translate": 0.02, "hflip": True})
  mean, std = jnp.asarray([0.4, 0.5, 0.6]), jnp.asarray([0.2, 0.25, 0.3])
  key = jax.random.PRNGKey(3)
  view = augment.weak_view(key, raw, cfg, mean, std)
  scaled_first = augment.weak_augment(key, raw.astype(jnp.float32) / 255.0, 10.0, 0.02, True)
  np.testing.assert_allclose(view, (scaled_first - mean) / std, atol=1e-4)
  assert not np.allclose(view, (raw / 255.0 - mean) / std)  # it did augment
  cfg.update(rotation_degrees=0.0, translate=0.0, hflip=False)
  np.testing.assert_allclose(augment.weak_view(key, raw, cfg, mean, std),
                             (raw / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_trains_end_to_end_with_float32_parameters(tmp_path):
  """Mixed precision (`model.dtype = "bfloat16"`): a whole run trains and evaluates, and the
  parameters stay float32 (the master weights)."""
  config = tiny_config(rounds=1, **{"model.dtype": "bfloat16"})
  experiment = train.Experiment(config)
  variables = experiment.initial_variables()
  new_variables, _, records = experiment.run_round(0, variables, experiment.method.init_state())
  assert np.all(np.isfinite(records[-1]["client_loss"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(new_variables["params"])} == {jnp.dtype("float32")}
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables["params"]),
                                                   jax.tree.leaves(new_variables["params"]))]
  assert all(moved)
  assert 0.0 <= experiment.evaluate(new_variables)["test"]["mAP"] <= 1.0


def _rounds(config, rounds):
  experiment = train.Experiment(config)
  variables, state, records = experiment.initial_variables(), experiment.method.init_state(), []
  for rnd in range(rounds):
    variables, state, new = experiment.run_round(rnd, variables, state)
    records += new
  return experiment, variables, records


@pytest.mark.parametrize("method,strategy,rounds,overrides", [
    ("fedavg", "shard", 1, {}),
    # FedNML's refinement (round 1) reads the images through `predict_train`; FedLSM's pools
    # through `frame.images` and `predict_all`.
    ("fednml", "loop", 2, {"fednml.warmup_rounds": 1, "fednml.refine_every": 1}),
    ("fedlsm", "loop", 1, {"fedlsm.mixup_pairs": 2, "fl.scan_unroll": 1}),
])
def test_per_client_image_layout_computes_the_same_run(method, strategy, rounds, overrides):
  results = []
  for image_layout in ("shared", "per_client"):
    config = tiny_config(method=method, **{"fl.strategy": strategy,
                                           "fl.image_layout": image_layout, **overrides})
    experiment, variables, records = _rounds(config, rounds=rounds)
    results.append((variables, [r for r in records if "client_loss" in r or "kind" in r]))
  shape = experiment.train_images.shape
  assert shape[:2] == experiment.layout.sample_index.shape  # (K, n_max, H, W, C) blocks
  if strategy == "shard":
    assert len(experiment.train_images.sharding.device_set) == 2
  # The same images reach the same computation: equal to the last bit.
  assert json.dumps(results[0][1]) == json.dumps(results[1][1])
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
