r"""Wall-clock time of a whole run (issue #6's goal: 100 FedNML rounds at the paper's configuration
in under 2 minutes on one H100).

  python benchmarks/full_run.py --preset=paper|cpu [--method=fednml] [--rounds=100]
      [--clients=K] [--train_per_client=N] [--image_size=S] [--local_epochs=E] [--synthetic]
      [--compile_cache=DIR] [--out=FILE.json]

The presets and size flags are those of `benchmarks/round_time.py` (the paper preset trains
ResNet-18 at 256 px on random images). The run is `fednml_jax.train.train_and_evaluate` in a
temporary workdir, as `run.py` runs it: compilation, every round, evaluation every
`eval.every` rounds, checkpoints and the summary, with JAX's persistent compilation cache off (a
cold start), or with the cache in `--compile_cache=DIR` (a second run with the same DIR loads its
programs from there, as every run of a sweep after the first does). `--model_dtype=bfloat16`
runs it in mixed precision.

Row: {preset, method, rounds, seconds, seconds_per_round, compiled_programs, backend, device,
data, model, model_dtype, strategy, compile_cache, test_final_mAP, parts}. `parts` splits the wall
time: for each kind of round (`round:` + the method's phase, or `round:refinement` for a round
whose host step refined labels) its count, first round (which compiles what that kind is first to
need), median and total seconds; the same for evaluation and checkpoint saves; `compile_estimate`
(Σ first − median over those; a part seen once adds nothing) and `other` (set-up: data, model
initialisation, the summary).
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import round_time  # noqa: E402
from fednml_jax import checkpointing, cli, train  # noqa: E402
from fednml_jax.engine import strategies  # noqa: E402


class PartTimer:
  """Wall time of a run's rounds (by kind), evaluations and checkpoint saves.

  `installed()` wraps `train.Experiment.run_round` (waiting for the round's variables, so that a
  round's device work is counted in it), `train.Experiment.evaluate` and
  `checkpointing.Checkpointer.save` for the duration of the block.
  """

  def __init__(self):
    self.times: dict[str, list[float]] = {}

  def _add(self, part: str, seconds: float):
    self.times.setdefault(part, []).append(seconds)

  @contextlib.contextmanager
  def installed(self):
    run_round = train.Experiment.run_round
    timer = self

    def timed_run_round(experiment, rnd, variables, method_state):
      start = time.perf_counter()
      out = run_round(experiment, rnd, variables, method_state)
      jax.block_until_ready(out[0])
      refined = any(r.get("kind") == "refinement" for r in out[2])
      timer._add("round:" + ("refinement" if refined else experiment.method.phase(rnd)),
                 time.perf_counter() - start)
      return out

    def timed(name, fn):
      def wrapper(*a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        timer._add(name, time.perf_counter() - start)
        return out
      return wrapper

    with mock.patch.object(train.Experiment, "run_round", timed_run_round), \
        mock.patch.object(train.Experiment, "evaluate", timed("eval", train.Experiment.evaluate)), \
        mock.patch.object(checkpointing.Checkpointer, "save",
                          timed("checkpoint", checkpointing.Checkpointer.save)):
      yield self

  def parts(self, total_seconds: float) -> dict:
    out = {name: {"count": len(t), "first": round(t[0], 4), "median": round(float(np.median(t)), 4),
                  "total": round(sum(t), 3)} for name, t in self.times.items()}
    out["compile_estimate"] = round(sum(p["first"] - p["median"] for p in out.values()), 2)
    out["other"] = round(total_seconds - sum(sum(t) for t in self.times.values()), 2)
    return out


def format_parts(parts: dict) -> str:
  lines = [f"{'part':20s}{'count':>7s}{'first (s)':>11s}{'median (s)':>12s}{'total (s)':>11s}"]
  for name, p in parts.items():
    if isinstance(p, dict):
      lines.append(f"{name:20s}{p['count']:7d}{p['first']:11.3f}{p['median']:12.4f}"
                   f"{p['total']:11.2f}")
  lines.append(f"compile (Σ first − median) ≈ {parts['compile_estimate']:.1f} s; set-up and the "
               f"rest {parts['other']:.1f} s")
  return "\n".join(lines)


def run(args) -> dict:
  cache = jax.config.jax_enable_compilation_cache
  cache_dir = jax.config.jax_compilation_cache_dir
  timer = PartTimer()
  try:
    with tempfile.TemporaryDirectory() as tmpdir:
      cli.enable_compile_cache(args.compile_cache or "none", tmpdir)
      config, data = round_time.preset_config(args, tmpdir)
      config.method, config.rounds = args.method, args.rounds
      start = time.perf_counter()
      with timer.installed():
        summary = train.train_and_evaluate(config, os.path.join(tmpdir, "run"))
      seconds = time.perf_counter() - start
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  row = {"preset": args.preset, "method": args.method, "rounds": args.rounds,
         "seconds": round(seconds, 2), "seconds_per_round": round(seconds / args.rounds, 4),
         "compiled_programs": summary["compiled_programs"], "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "data": data,
         "model": config.model.name, "model_dtype": config.model.dtype,
         "strategy": strategies.resolve_strategy(config.fl.strategy),
         "compile_cache": args.compile_cache or None,
         "test_final_mAP": summary["test_final"]["mAP"], "parts": timer.parts(seconds)}
  print(f"[{args.preset}] {args.method}: {args.rounds} rounds in {seconds:.1f} s "
        f"({seconds / args.rounds:.3f} s/round, all included) on {row['device']}, "
        f"strategy {row['strategy']}", flush=True)
  print(format_parts(row["parts"]), flush=True)
  return row


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=round_time.PRESETS, required=True)
  parser.add_argument("--method", default="fednml")
  parser.add_argument("--rounds", type=int, default=100)
  round_time.add_preset_size_args(parser)
  parser.add_argument("--compile_cache", default="",
                      help="folder of JAX's persistent compilation cache (default: none, a cold "
                           "start)")
  parser.add_argument("--out", help="write the row as JSON to this file")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  return args


def main(argv=None) -> dict:
  return round_time.run_and_write(parse_args, run, argv)


if __name__ == "__main__":
  main()
