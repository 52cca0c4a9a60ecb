"""Batched runs (`train.RunBatch`): several runs on a leading run axis compute what separate runs
compute, and runs that would compile to different programs are refused."""

import re

import jax
import numpy as np
import pytest

from conftest import tiny_config

from fednml_jax import train
from fednml_jax.engine import strategies
from fednml_jax.errors import ConfigError


def _separate_and_batched(configs, rounds):
  separate = []
  for config in configs:
    experiment = train.Experiment(config)
    variables, state = experiment.initial_variables(), experiment.method.init_state()
    records = []
    for rnd in range(rounds):
      variables, state, new = experiment.run_round(rnd, variables, state)
      records += new
    separate.append((variables, records))
  batch = train.RunBatch(configs)
  variables = [e.initial_variables() for e in batch.experiments]
  states = [e.method.init_state() for e in batch.experiments]
  records = [[] for _ in configs]
  for rnd in range(rounds):
    variables, states, new = batch.run_round(rnd, variables, states)
    for mine, more in zip(records, new):
      mine += more
  return separate, list(zip(variables, records)), batch


def _assert_close(batched_vars, separate_vars, exact):
  """Bitwise equal for `loop` (the same client program on the same inputs); otherwise per tensor,
  relative L2 distance 1e-3, the criterion of test_engine's strategy agreement (vmapped
  convolutions reassociate sums, and Adam turns that noise into steps of up to ~lr)."""
  for a, b in zip(jax.tree.leaves(batched_vars), jax.tree.leaves(separate_vars)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if exact:
      np.testing.assert_array_equal(a, b)
    else:
      assert np.linalg.norm(a - b) <= 1e-3 * max(np.linalg.norm(a), 1.0)


def _losses(records):
  return np.array([r["client_loss"] for r in records if "client_loss" in r])


@pytest.mark.parametrize("strategy, runs", [("shard", 2), ("shard", 3), ("loop", 2)])
def test_batched_runs_match_separate_runs(strategy, runs):
  # Seeds with noise settings of one FedAvg config. `loop` runs the same client program on the
  # same inputs: bitwise equal after 2 rounds. `shard` with 2 runs on the 2 devices splits the runs
  # over them (`shard_runs`); with 3, it vmaps them and splits each run's clients. Those programs
  # reassociate float sums, which Adam amplifies round after round: compared after 1 round, as in
  # test_engine.
  # A rolled local scan under shard: the unrolled clients of `shard` on CPU compile slowly enough.
  unroll = {"fl.scan_unroll": 1} if strategy == "shard" else {}
  configs = [tiny_config(seed=s, **{"fl.strategy": strategy, "labels.noise_rate": rate}, **unroll)
             for s, rate in ((0, 0.2), (1, 0.4), (2, 0.3))[:runs]]
  separate, batched, batch = _separate_and_batched(configs, rounds=2 if strategy == "loop" else 1)
  assert batch.shard_runs == (strategy == "shard" and runs % jax.device_count() == 0)
  for (v_sep, r_sep), (v_bat, r_bat) in zip(separate, batched):
    np.testing.assert_allclose(_losses(r_bat), _losses(r_sep),
                               rtol=0 if strategy == "loop" else 1e-4)
    _assert_close(v_bat, v_sep, exact=strategy == "loop")
  # The runs really differ from each other, and one batched program served both rounds.
  assert not np.allclose(_losses(batched[0][1]), _losses(batched[1][1]))
  if strategy != "loop":  # a second round reuses the batched program
    variables = [e.initial_variables() for e in batch.experiments]
    batch.run_round(1, variables, [e.method.init_state() for e in batch.experiments])
    name = "train (batched runs)" + (" over devices" if batch.shard_runs else "")
    assert batch.experiments[0].programs[name].traces == 1


def test_runs_split_over_the_devices_are_not_vmapped():
  """2 runs on the 2 devices under `shard`: each device trains its run's clients in turn, so the
  round program has no grouped convolution (which vmapped runs or clients become)."""
  configs = [tiny_config(seed=s, **{"fl.strategy": "shard", "fl.scan_unroll": 1}) for s in (0, 1)]
  batch = train.RunBatch(configs)
  assert batch.shard_runs
  variables = [e.initial_variables() for e in batch.experiments]
  inputs = [e.prepare_round(0, v, e.method.init_state())
            for e, v in zip(batch.experiments, variables)]
  args = (strategies.place_runs(strategies.stack_trees(variables)),
          batch.experiments[0].train_images,
          strategies.place_runs(strategies.stack_trees([i.clients for i in inputs])),
          strategies.place_runs(strategies.stack_trees([i.scalars for i in inputs])),
          strategies.place_runs(np.stack([i.round_key for i in inputs])))
  grouped = re.compile(r"feature_group_count=([2-9]|\d\d)")
  for shard_runs, expected in ((True, False), (False, True)):
    program = batch.experiments[0].program_for("train", batched_runs=True, shard_runs=shard_runs)
    jaxpr = str(jax.make_jaxpr(program._round.jitted)(*args))
    assert bool(grouped.search(jaxpr)) == expected, shard_runs


def test_batched_fednml_runs_match_separate_runs_through_a_refinement():
  configs = [tiny_config(method="fednml", seed=s, rounds=2, **{
      "fl.strategy": "loop", "fednml.warmup_rounds": 1, "fednml.refine_every": 1})
      for s in (0, 1)]
  separate, batched, _ = _separate_and_batched(configs, rounds=2)  # round 1 refines
  for (v_sep, r_sep), (v_bat, r_bat) in zip(separate, batched):
    assert [r.get("kind") for r in r_bat] == [r.get("kind") for r in r_sep]
    assert any(r.get("kind") == "refinement" for r in r_bat)
    np.testing.assert_array_equal(_losses(r_bat), _losses(r_sep))
    _assert_close(v_bat, v_sep, exact=True)


def test_runs_with_different_programs_are_refused():
  configs = [tiny_config(seed=0), tiny_config(seed=1, **{"fl.local_epochs": 2})]
  batch = train.RunBatch(configs)
  variables = [e.initial_variables() for e in batch.experiments]
  states = [e.method.init_state() for e in batch.experiments]
  with pytest.raises(ConfigError, match="different programs in phase 'train'"):
    batch.run_round(0, variables, states)
  with pytest.raises(ConfigError, match="must share config.data"):
    train.RunBatch([tiny_config(), tiny_config(**{"data.embedded_train": 120})])
