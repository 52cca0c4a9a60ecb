r"""Sweep throughput: R runs one after another in one process, against N worker processes.

  python benchmarks/sweep_workers.py --preset=cpu|paper [--runs=8] [--rounds=3] [--method=fedavg]
      [--workers=1,2,4] [--workers_per_gpu=K] [--clients=K] [--train_per_client=N]
      [--image_size=S] [--local_epochs=E] [--model_dtype=bfloat16] [--synthetic] [--out=FILE.json]

The presets and size flags are those of `benchmarks/round_time.py`. R runs = seeds 0 … R−1 of the
preset's config with `--rounds` rounds each (one method's cells of a sweep). For each worker count
N the benchmark runs the real command, `python -m fednml_jax.sweep --workers=N`, in a fresh sweep
folder with a fresh compilation cache (as a new sweep starts), and times it from launch to exit:
Python's start, data loading, every compile, every round, evaluation and checkpoint included.
N = 1 runs the runs one after another in the sweep's own process; N > 1 in N worker processes,
`--workers_per_gpu` of them sharing each GPU (default N: all on the first GPU, the case of a
one-GPU machine; on a CPU the workers share the cores whatever it says). `speedup` is the first
row's seconds over this row's. Rows: {preset, method, runs, rounds, workers, workers_per_gpu,
seconds, runs_per_hour, speedup, run_seconds (each run's own time, from its summary.json), device
(the workers' devices, as they logged them), status}.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

# round_time caps JAX's GPU memory for its own process; the workers must not inherit that cap.
USER_MEMORY_FRACTION = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")

import round_time  # noqa: E402
from fednml_jax import config as config_lib  # noqa: E402

SWEEP_FILE = '''"""Made by benchmarks/sweep_workers.py: seeds 0..{last_seed} of one run config."""
import json

from fednml_jax import config as config_lib
from fednml_jax.sweep import sweep_config


def get_config():
  with open({base!r}) as f:
    base = config_lib.from_saved(json.load(f))
  return sweep_config(base=base, methods=({method!r},), settings=(("bench", {{}}),),
                      seeds=tuple(range({runs})))
'''


def write_sweep_file(folder: str, base, method: str, runs: int) -> str:
  base_path = os.path.join(folder, "base_config.json")
  with open(base_path, "w") as f:
    f.write(config_lib.to_json(base))
  path = os.path.join(folder, "bench_sweep.py")
  with open(path, "w") as f:
    f.write(SWEEP_FILE.format(base=base_path, method=method, runs=runs, last_seed=runs - 1))
  return path


def child_environment() -> dict:
  env = dict(os.environ, FEDNML_NO_PROGRESS="1")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  if USER_MEMORY_FRACTION is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = USER_MEMORY_FRACTION
  return env


def time_sweep(sweep_file: str, workdir: str, workers: int, per_gpu: int) -> dict:
  """Runs the sweep command once in a new `workdir`; its wall time and what its log says."""
  command = [sys.executable, "-m", "fednml_jax.sweep", f"--config={sweep_file}",
             f"--workdir={workdir}", f"--workers={workers}", f"--workers_per_gpu={per_gpu}",
             f"--compile_cache={os.path.join(workdir, 'xla_cache')}"]
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True,
                        text=True)
  seconds = time.perf_counter() - start
  log = done.stderr
  run_seconds = []
  for summary in sorted(glob.glob(os.path.join(workdir, "*", "*", "seed*", "summary.json"))):
    with open(summary) as f:
      run_seconds.append(round(json.load(f)["seconds"], 1))
  devices = sorted(set(re.findall(r"^worker \d+ \(pid \d+[^)]*\): (.*)$", log, re.M)))
  status = "ok" if done.returncode == 0 else f"exit code {done.returncode}: {log[-2000:]}"
  return {"seconds": seconds, "run_seconds": run_seconds, "device": "; ".join(devices)
          or "the sweep's own process", "status": status}


def run(args) -> list[dict]:
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    base, data = round_time.preset_config(args, folder)
    base.rounds = args.rounds
    print(f"[{args.preset}] {args.method}: {args.runs} runs × {args.rounds} rounds on {data}; "
          f"{base.model.name}, {base.fl.num_clients} clients", flush=True)
    sweep_file = write_sweep_file(folder, base, args.method, args.runs)
    for index, workers in enumerate(args.workers):
      per_gpu = args.workers_per_gpu or workers
      result = time_sweep(sweep_file, os.path.join(folder, f"sweep{index}_workers{workers}"),
                          workers, per_gpu)
      first = rows[0]["seconds"] if rows else result["seconds"]
      row = {"preset": args.preset, "method": args.method, "runs": args.runs,
             "rounds": args.rounds, "workers": workers, "workers_per_gpu": per_gpu,
             "seconds": round(result["seconds"], 2),
             "runs_per_hour": round(3600 * args.runs / result["seconds"], 1),
             "speedup": round(first / result["seconds"], 3),
             "run_seconds": result["run_seconds"], "device": result["device"],
             "status": result["status"]}
      rows.append(row)
      print(f"{workers:3d} workers ({per_gpu} per GPU): {row['seconds']:8.1f} s, "
            f"{row['runs_per_hour']:8.1f} runs/hour, speedup {row['speedup']:5.2f}, runs took "
            f"{row['run_seconds']} s; {row['device']}"
            + ("" if row["status"] == "ok" else f"; FAILED: {row['status']}"), flush=True)
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=round_time.PRESETS, required=True)
  parser.add_argument("--runs", type=int, default=8, help="runs in the sweep (seeds 0..R-1)")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of each run")
  parser.add_argument("--method", default="fedavg")
  parser.add_argument("--workers", default="1,2,4",
                      help="worker counts to time, in order (repeats allowed: 1,2,1,2)")
  parser.add_argument("--workers_per_gpu", type=int,
                      help="workers sharing one GPU (default: the worker count)")
  round_time.add_preset_size_args(parser)
  parser.add_argument("--out", help="write the rows as a JSON list to this file")
  args = parser.parse_args(argv)
  args.workers = round_time.positive_ints(parser, args.workers, "workers")
  if min(args.runs, args.rounds, args.workers_per_gpu or 1) < 1:
    parser.error("--runs, --rounds and --workers_per_gpu must be at least 1")
  return args


def main(argv=None) -> list[dict]:
  return round_time.run_and_write(parse_args, run, argv)


if __name__ == "__main__":
  main()
