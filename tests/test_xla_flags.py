"""`import fednml_jax` takes CPU convolutions out of YNNPACK (`fednml_jax.xla_flags`), unless the
user's XLA_FLAGS say otherwise."""

import os
import subprocess
import sys

from fednml_jax import xla_flags

from conftest import REPO

# A convolution's weight gradient of SmallCNN's conv2 shape (YNNPACK takes it by default).
COMPILED_CONV_GRADIENT = """
import fednml_jax, jax, jax.numpy as jnp
x = jnp.ones((8, 16, 16, 16))
loss = lambda w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()
print(jax.jit(jax.grad(loss)).lower(jnp.ones((3, 3, 16, 32))).compile().as_text())
"""


def _compiled_in_a_fresh_process(xla_flags_value):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags_value is not None:
    env["XLA_FLAGS"] = xla_flags_value
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-c", COMPILED_CONV_GRADIENT], cwd=REPO, env=env,
                        capture_output=True, text=True, check=True).stdout


def test_the_flag_is_added_once_and_a_users_choice_kept():
  env = {}
  xla_flags.prefer_xla_cpu_convolutions(env)
  assert env == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}
  xla_flags.prefer_xla_cpu_convolutions(env)  # a second import changes nothing
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  xla_flags.prefer_xla_cpu_convolutions(env)
  assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                              "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"}
  xla_flags.prefer_xla_cpu_convolutions(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"


def test_importing_the_package_keeps_convolutions_out_of_ynnpack_unless_the_user_asks():
  assert "convolution(" in (hlo := _compiled_in_a_fresh_process(None))
  assert "ynn_fusion" not in hlo
  # The check can fail: the user's own setting brings YNNPACK's convolution back.
  assert "ynn_fusion" in _compiled_in_a_fresh_process(
      "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")
