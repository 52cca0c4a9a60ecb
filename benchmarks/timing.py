"""Timing helpers shared by the benchmark scripts (no flags, so every script can import it)."""

import importlib.util
import time

import jax

from fednml_jax import train


def load_config(path):
  """A run config from a config file, with `compare` cleared (one method per Experiment)."""
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.compare = ""
  return config


def time_rounds(config, rounds: int):
  """(seconds of the first round, which includes compiling; mean seconds of the next `rounds`
  rounds), each awaited with `block_until_ready`, for one Experiment of `config`."""
  experiment = train.Experiment(config)
  variables = experiment.initial_variables()
  state = experiment.method.init_state()
  start = time.perf_counter()
  variables, state, _ = experiment.run_round(0, variables, state)
  jax.block_until_ready(variables)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for rnd in range(1, rounds + 1):
    variables, state, _ = experiment.run_round(rnd, variables, state)
  jax.block_until_ready(variables)
  return compile_seconds, (time.perf_counter() - start) / rounds
