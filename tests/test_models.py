"""Tests of fednml_jax.models: shapes, parameter counts, normalisation, dtypes and weight files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fednml_jax.errors import ConfigError
from fednml_jax.models import (BasicBlock, Bottleneck, SmallCNN, build_model, count_params,
                               flatten_variables, group_count, init_variables, load_pretrained, merge_pretrained,
                               read_weights_file, save_variables)

RNG = jax.random.PRNGKey(0)


def images(n, size, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3), jnp.float32)


def abstract_variables(model, size):
  return jax.eval_shape(functools.partial(init_variables, model, image_shape=(size, size, 3)), RNG)


@functools.lru_cache(maxsize=None)
def built(name, norm="batch", num_outputs=5):
  """A float32 model and its variables, built once per argument tuple for the whole module.

  Variables do not depend on the image size (global pooling) nor on the compute dtype.
  """
  model = build_model({"name": name, "norm": norm, "num_outputs": num_outputs})
  return model, init_variables(model, RNG, (32, 32, 3))


@pytest.mark.parametrize("name,norm,features", [
    ("small_cnn", "batch", 128), ("small_cnn", "group", 128),
    ("resnet18", "batch", 512), ("resnet18", "group", 512),
])
def test_output_and_feature_shapes_at_32px(name, norm, features):
  model, variables = built(name, norm)
  x = images(3, 32)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  (train_logits, feats), _ = model.apply(variables, x, train=True, return_features=True,
                                         mutable=["batch_stats"])
  assert train_logits.shape == (3, 5)
  assert feats.shape == (3, features)


def test_resnet18_at_64px():
  model, variables = built("resnet18")
  logits, feats = jax.jit(functools.partial(model.apply, train=False, return_features=True))(
      variables, images(2, 64))
  assert logits.shape == (2, 5) and feats.shape == (2, 512)


def test_resnet50_at_32px():
  # Abstract evaluation only: a real ResNet-50 init costs seconds of XLA:CPU compilation.
  for norm in ("batch", "group"):
    model = build_model({"name": "resnet50", "norm": norm, "num_outputs": 7})
    variables = abstract_variables(model, 32)
    assert ("layer4_2" in variables["batch_stats"]) == (norm == "batch")
    assert variables["params"]["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)
    (logits, feats), _ = jax.eval_shape(
        functools.partial(model.apply, train=True, return_features=True, mutable=["batch_stats"]),
        variables, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert logits.shape == (2, 7) and feats.shape == (2, 2048)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
def test_batch_stats_present_only_with_batch_norm(name):
  for norm, present in (("batch", True), ("group", False)):
    variables = abstract_variables(build_model({"name": name, "norm": norm, "num_outputs": 3}), 32)
    assert set(variables) == {"params", "batch_stats"}
    assert bool(variables["batch_stats"]) == present


@pytest.mark.parametrize("name,expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_matches_torchvision(name, expected):
  for norm in ("batch", "group"):
    model = build_model({"name": name, "norm": norm, "num_outputs": 1000})
    assert count_params(abstract_variables(model, 32)["params"]) == expected


def test_group_count():
  assert group_count(64) == 32 and group_count(2048) == 32
  assert group_count(48) == 24 and group_count(20) == 20 and group_count(7) == 7
  assert group_count(37) == 1


def test_batch_norm_train_updates_stats_and_eval_does_not():
  model, variables = built("small_cnn")
  x = images(8, 32)
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old, new = variables["batch_stats"]["bn1"], updated["batch_stats"]["bn1"]
  assert not np.allclose(old["mean"], new["mean"])
  assert not np.allclose(old["var"], new["var"])
  # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic.
  batch_mean = (new["mean"] - 0.9 * old["mean"]) / 0.1
  assert np.all(np.isfinite(batch_mean))
  out, unchanged = model.apply(variables, x, train=False, mutable=["batch_stats"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, unchanged["batch_stats"],
                         variables["batch_stats"])
  # Eval mode uses running statistics: a row's output does not depend on the rest of the batch.
  np.testing.assert_allclose(model.apply(variables, x[:2], train=False), out[:2], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("block,last", [(BasicBlock, "bn2"), (Bottleneck, "bn3")])
def test_zero_init_residual(block, last):
  for zero in (False, True):
    params = block(planes=8, stride=2, zero_init_residual=zero).init(
        RNG, jnp.zeros((1, 8, 8, 16)), train=False)["params"]
    assert np.all(np.asarray(params[last]["scale"]) == (0 if zero else 1))
    assert np.all(np.asarray(params["bn1"]["scale"]) == 1)
    assert "downsample_conv" in params
  model = build_model({"name": "resnet50", "num_outputs": 2, "zero_init_residual": True})
  assert model.zero_init_residual and model.block is Bottleneck


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50"])
def test_bfloat16_compute_with_float32_params(name):
  model = build_model({"name": name, "num_outputs": 5, "dtype": "bfloat16"})
  variables = abstract_variables(model, 32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  (logits, feats), updated = jax.eval_shape(
      functools.partial(model.apply, train=True, return_features=True, mutable=["batch_stats"]),
      variables, jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32))
  assert logits.dtype == jnp.bfloat16 and feats.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updated))


def test_bfloat16_small_cnn_runs():
  model = build_model({"name": "small_cnn", "num_outputs": 5, "dtype": "bfloat16"})
  _, variables = built("small_cnn")  # the same float32 variables as the float32 model's
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images(2, 16))
  assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_vmap_over_stacked_client_variables():
  for norm in ("batch", "group"):
    model, variables = built("small_cnn", norm)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), variables)
    x = jnp.stack([images(4, 32, seed) for seed in range(3)])
    logits, updated = jax.vmap(
        lambda v, xs: model.apply(v, xs, train=True, mutable=["batch_stats"]))(stacked, x)
    assert logits.shape == (3, 4, 5)
    assert jax.tree_util.tree_structure(updated["batch_stats"]) == jax.tree_util.tree_structure(
        stacked["batch_stats"])


def test_build_model_config_errors():
  with pytest.raises(ConfigError, match="small_cnn"):
    build_model({"name": "vgg16", "num_outputs": 3})
  with pytest.raises(ConfigError, match="norm"):
    build_model({"name": "resnet18", "norm": "layer", "num_outputs": 3})
  with pytest.raises(ConfigError, match="dtype"):
    build_model({"name": "resnet18", "dtype": "float16", "num_outputs": 3})
  with pytest.raises(ConfigError, match="num_outputs"):
    build_model({"name": "resnet18", "num_outputs": 0})
  with pytest.raises(ConfigError, match="width"):
    build_model({"name": "small_cnn", "num_outputs": 3, "width": -4})


def test_build_model_small_cnn_width():
  assert build_model({"name": "small_cnn", "num_outputs": 3, "width": 16}).widths == (16, 32, 64)
  model = build_model({"name": "small_cnn", "num_outputs": 3, "width": [8, 8, 16, 24]})
  assert isinstance(model, SmallCNN) and model.widths == (8, 8, 16, 24)
  variables = abstract_variables(model, 32)
  assert variables["params"]["head"]["kernel"].shape == (24, 3)


def test_build_model_accepts_config_dict():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict({"name": "resnet18", "norm": "group", "num_outputs": 4,
                                   "width": 32, "dtype": "bfloat16"})
  model = build_model(cfg)
  assert model.norm == "group" and model.dtype == jnp.bfloat16 and model.num_outputs == 4


def perturbed(variables, seed):
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [leaf + jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)])


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_save_and_load_pretrained_round_trip(tmp_path):
  _, variables = built("small_cnn")
  path = tmp_path / "sub" / "weights.msgpack"
  save_variables(variables, path)
  restored = load_pretrained(perturbed(variables, 3), path)
  assert_trees_equal(restored, variables)
  # GroupNorm variables (empty batch_stats) round-trip too.
  _, gn_variables = built("small_cnn", "group")
  save_variables(gn_variables, tmp_path / "gn.msgpack")
  assert_trees_equal(load_pretrained(perturbed(gn_variables, 4), tmp_path / "gn.msgpack"),
                     gn_variables)


def test_load_pretrained_from_npz(tmp_path):
  _, variables = built("small_cnn")
  flat = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
  flat["params/not_in_model/kernel"] = np.zeros(3)
  np.savez(tmp_path / "weights.npz", **flat)
  assert set(read_weights_file(tmp_path / "weights.npz")) == set(flat)
  merged, report = merge_pretrained(perturbed(variables, 5), flat, exclude=["params/head"])
  assert report.unused == ("params/not_in_model/kernel",)
  assert report.excluded == ("params/head/bias", "params/head/kernel")
  assert_trees_equal(merged["batch_stats"], variables["batch_stats"])
  assert not np.allclose(merged["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  assert_trees_equal(load_pretrained(perturbed(variables, 6), tmp_path / "weights.npz"), variables)


def test_load_pretrained_skips_head_with_other_num_outputs(tmp_path):
  _, source = built("small_cnn", num_outputs=5)
  save_variables(source, tmp_path / "w.msgpack")
  _, target = built("small_cnn", num_outputs=3)
  merged, report = merge_pretrained(target, read_weights_file(tmp_path / "w.msgpack"))
  assert report.shape_mismatch == ("params/head/bias", "params/head/kernel")
  assert report.skipped == 2 and not report.missing
  loaded = load_pretrained(target, tmp_path / "w.msgpack")
  assert_trees_equal(loaded["params"]["head"], target["params"]["head"])
  assert_trees_equal(loaded["params"]["conv2"], source["params"]["conv2"])
  assert_trees_equal(loaded["batch_stats"], source["batch_stats"])


def test_load_pretrained_errors(tmp_path):
  _, variables = built("small_cnn")
  with pytest.raises(ConfigError, match="does not exist"):
    load_pretrained(variables, tmp_path / "missing.msgpack")
  garbage = tmp_path / "garbage.msgpack"
  garbage.write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(ConfigError, match="neither"):
    load_pretrained(variables, garbage)
  text = tmp_path / "notes.msgpack"
  text.write_text("these are not weights")
  with pytest.raises(ConfigError):
    load_pretrained(variables, text)
  bad_zip = tmp_path / "bad.npz"
  bad_zip.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
  with pytest.raises(ConfigError, match="neither"):
    load_pretrained(variables, bad_zip)
  _, other = built("resnet18")
  save_variables(other, tmp_path / "resnet.msgpack")
  small = build_model({"name": "small_cnn", "num_outputs": 2, "width": 8})
  with pytest.raises(ConfigError, match="matches no variable"):
    load_pretrained(init_variables(small, RNG, (32, 32, 3)), tmp_path / "resnet.msgpack")


def test_max_pool_2x2_matches_flax_max_pool_and_its_gradient():
  import flax.linen as nn
  from fednml_jax.models.cnn import max_pool_2x2
  for shape in ((2, 6, 6, 3), (1, 5, 7, 2)):  # an odd last row/column is dropped, as VALID does
    x = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)  # no ties
    flax_pool = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))  # noqa: E731
    np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
    weights = jax.random.normal(jax.random.PRNGKey(1), flax_pool(x).shape)
    grad = lambda pool: jax.grad(lambda a: jnp.sum(pool(a) * weights))(x)  # noqa: E731
    np.testing.assert_array_equal(grad(max_pool_2x2), grad(flax_pool))
  # By hand: one 2x2 window [[1, 4], [3, 2]] → 4; its gradient goes to the 4.
  x = jnp.array([[1.0, 4.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
  assert float(max_pool_2x2(x).squeeze()) == 4.0
  np.testing.assert_array_equal(
      jax.grad(lambda a: max_pool_2x2(a).sum())(x).reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


def test_cpu_slow_path_warning_names_resnets_with_2x2_last_stage_maps():
  from fednml_jax.models import cpu_slow_path_warning
  # ResNets halve the size five times: 33-64 px leave 2x2 maps in the last stage.
  assert "64 px" in cpu_slow_path_warning("resnet18", 64)
  assert cpu_slow_path_warning("resnet50", 40) is not None
  for name, size in (("resnet18", 32), ("resnet18", 96), ("resnet18", 256), ("small_cnn", 64)):
    assert cpu_slow_path_warning(name, size) is None
