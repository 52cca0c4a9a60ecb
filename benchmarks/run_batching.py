r"""Does batching independent runs into one program pay? Round time of R runs, separate vs batched.

  python benchmarks/run_batching.py --preset=cpu|paper [--runs=1,2,4,8,16,32] [--rounds=2]
      [--method=fedavg] [--batched_strategy=vmap|shard|loop] [--clients=K]
      [--train_per_client=N] [--image_size=S] [--local_epochs=E] [--synthetic] [--out=FILE.json]

The presets and size flags are those of `benchmarks/round_time.py`. R runs = seeds 0 … R−1 of the
preset's config (what a sweep's cells of one method look like).
- `separate`: one run's round (local training + aggregation, no evaluation) under the default
  strategy (`fl.strategy=auto`: `loop` on one device, `shard` over several accelerators), timed
  on seed 0; R runs one after another cost R times that.
- `batched`: `fednml_jax.train.RunBatch` over the R runs, every round one program with a leading
  run axis (`--batched_strategy`, default `vmap` on one device, `shard` on several: then R a
  multiple of the device count splits the runs over the devices, `runs_over_devices`), timed as a
  whole.
Each is the mean of `--rounds` rounds after one untimed round (its excess over a steady round is
`compile_seconds`). `speedup` = R · separate seconds / batched seconds (> 1: batching pays). A run
count whose batched round does not fit in device memory is reported as `out_of_memory` and ends
the sweep (that is where memory is full). Rows: {preset, method, runs, backend, devices,
batched_strategy, runs_over_devices, separate_strategy, separate_seconds_per_round,
batched_seconds_per_round, seconds_per_run_round, speedup, images_per_second, compile_seconds,
status}.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402

import round_time  # noqa: E402
from fednml_jax import train  # noqa: E402
from fednml_jax.engine import strategies  # noqa: E402


def _timed(step, rounds: int):
  """(first-round seconds minus a steady round, mean seconds of `rounds` further rounds)."""
  start = time.perf_counter()
  jax.block_until_ready(step(0))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for rnd in range(1, rounds + 1):
    out = step(rnd)
  jax.block_until_ready(out)
  steady = (time.perf_counter() - start) / rounds
  return max(first - steady, 0.0), steady


def time_separate(config, rounds: int):
  experiment = train.Experiment(config)
  state = {"variables": experiment.initial_variables(), "method": experiment.method.init_state()}

  def step(rnd):
    state["variables"], state["method"], _ = experiment.run_round(rnd, state["variables"],
                                                                  state["method"])
    return state["variables"]

  return _timed(step, rounds), experiment


def time_batched(configs, rounds: int):
  batch = train.RunBatch(configs)
  state = {"variables": [e.initial_variables() for e in batch.experiments],
           "method": [e.method.init_state() for e in batch.experiments]}

  def step(rnd):
    state["variables"], state["method"], _ = batch.run_round(rnd, state["variables"],
                                                             state["method"])
    return state["variables"]

  return _timed(step, rounds)


def _out_of_memory(err: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def run(args) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as tmpdir:
    base, data = round_time.preset_config(args, tmpdir)
    base.method = args.method
    batched_strategy = args.batched_strategy or ("shard" if jax.device_count() > 1 else "vmap")
    (sep_compile, separate), experiment = time_separate(base, args.rounds)
    images_per_round = int(experiment.layout.counts.sum()) * base.fl.local_epochs
    print(f"[{args.preset}] {args.method} on {data}: one run's round {separate:.3f} s "
          f"({experiment.strategy}; compile {sep_compile:.1f} s)", flush=True)
    del experiment
    for runs in args.runs:
      configs = []
      for seed in range(runs):
        config = base.copy_and_resolve_references()
        config.seed, config.fl.strategy = seed, batched_strategy
        configs.append(config)
      row = {"preset": args.preset, "method": args.method, "data": data, "runs": runs,
             "backend": jax.default_backend(), "devices": jax.device_count(),
             "batched_strategy": batched_strategy,
             "runs_over_devices": batched_strategy == "shard" and runs % jax.device_count() == 0,
             "separate_strategy": strategies.resolve_strategy(base.fl.strategy),
             "separate_seconds_per_round": round(separate, 4)}
      try:
        compile_s, batched = time_batched(configs, args.rounds)
      except Exception as err:  # noqa: BLE001 -- XLA reports exhausted memory as a runtime error
        if not _out_of_memory(err):
          raise
        rows.append(dict(row, status="out_of_memory"))
        print(f"{runs:4d} runs: out of device memory; stopping", flush=True)
        break
      rows.append(dict(row, status="ok", batched_seconds_per_round=round(batched, 4),
                       seconds_per_run_round=round(batched / runs, 4),
                       speedup=round(runs * separate / batched, 3),
                       images_per_second=round(runs * images_per_round / batched, 1),
                       compile_seconds=round(compile_s, 2)))
      print(f"{runs:4d} runs: batched {batched:8.3f} s/round ({batched / runs:7.3f} s per run), "
            f"separate {runs * separate:8.3f} s, speedup {runs * separate / batched:6.2f}, "
            f"compile {compile_s:6.1f} s", flush=True)
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=round_time.PRESETS, required=True)
  parser.add_argument("--runs", default="1,2,4,8,16,32",
                      help="run counts to time, in increasing order")
  parser.add_argument("--rounds", type=int, default=2, help="timed rounds per run count")
  parser.add_argument("--method", default="fedavg")
  parser.add_argument("--batched_strategy", choices=("vmap", "shard", "loop"))
  round_time.add_preset_size_args(parser)  # --strategy: that of the separate runs
  parser.add_argument("--out", help="write the rows as a JSON list to this file")
  args = parser.parse_args(argv)
  args.runs = round_time.positive_ints(parser, args.runs, "runs")
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  return args


def main(argv=None) -> list[dict]:
  return round_time.run_and_write(parse_args, run, argv)


if __name__ == "__main__":
  main()
