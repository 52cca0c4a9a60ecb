"""Test set-up: two virtual CPU devices (so the `shard` strategy really splits clients), quiet
progress bars, and helpers shared by the tests."""

import os

# Must happen before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("FEDNML_NO_PROGRESS", "1")
# The tests compile the same small programs many times (in this process and in the subprocesses
# that run run.py): JAX's persistent compilation cache makes every compile after the first a read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "fednml_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(name: str) -> pathlib.Path:
  """Path of a shared real-data file; skips the test when absent, fails when CI=true."""
  path = SHARED_DATA / name
  if not path.exists():
    message = f"{path} is absent: the shared real data sits beside the checkout as ../shared/data"
    if os.environ.get("CI") == "true":
      pytest.fail(message + " (CI=true: real-data tests must run in CI)")
    pytest.skip(message)
  return path


def tiny_config(**overrides):
  """A fast config on a small slice of the embedded data."""
  from fednml_jax.config import base_config
  c = base_config()
  c.rounds = 2
  c.data.source = "embedded"
  c.data.embedded_train = 160
  c.data.embedded_val = 60
  c.data.embedded_test = 80
  c.data.min_positives = 5
  c.labels.noise_rate = 0.2
  c.labels.annotation_num = 7
  c.fl.num_clients = 3
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.optim.lr = 3e-3
  c.model.name = "small_cnn"
  c.model.width = 8
  c.eval.every = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def interrupt_then_resume(make_config, workdir, at_round: int, monkeypatch):
  """Runs `make_config()` in `workdir`, interrupted as round `at_round` starts, then resumes it
  with the same config; returns the resumed run's summary."""
  from fednml_jax import train
  real_run_round = train.Experiment.run_round

  def failing(self, rnd, *args):
    if rnd == at_round:
      raise KeyboardInterrupt
    return real_run_round(self, rnd, *args)

  monkeypatch.setattr(train.Experiment, "run_round", failing)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(make_config(), str(workdir))
  monkeypatch.setattr(train.Experiment, "run_round", real_run_round)
  return train.train_and_evaluate(make_config(), str(workdir))
