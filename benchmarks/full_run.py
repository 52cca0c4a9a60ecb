r"""Wall-clock time of a whole run (issue #6's goal: 100 FedNML rounds at the paper's configuration
in under 2 minutes on one H100).

  python benchmarks/full_run.py --preset=paper|cpu [--method=fednml] [--rounds=100]
      [--clients=K] [--train_per_client=N] [--image_size=S] [--local_epochs=E] [--synthetic]
      [--out=FILE.json]

The presets and size flags are those of `benchmarks/round_time.py` (the paper preset trains
ResNet-18 at 256 px on random images). The run is `fednml_jax.train.train_and_evaluate` in a
temporary workdir, as `run.py` runs it: compilation, every round, evaluation every
`eval.every` rounds, checkpoints and the summary, with JAX's persistent compilation cache off (a
cold start). Row: {preset, method, rounds, seconds, seconds_per_round, compiled_programs, backend,
device, data, model, model_dtype, test_final_mAP}; `--model_dtype=bfloat16` runs it in mixed
precision.
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


def run(args) -> dict:
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    with tempfile.TemporaryDirectory() as tmpdir:
      config, data = round_time.preset_config(args, tmpdir)
      config.method, config.rounds = args.method, args.rounds
      start = time.perf_counter()
      summary = train.train_and_evaluate(config, os.path.join(tmpdir, "run"))
      seconds = time.perf_counter() - start
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  row = {"preset": args.preset, "method": args.method, "rounds": args.rounds,
         "seconds": round(seconds, 2), "seconds_per_round": round(seconds / args.rounds, 4),
         "compiled_programs": summary["compiled_programs"], "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "data": data,
         "model": config.model.name, "model_dtype": config.model.dtype,
         "test_final_mAP": summary["test_final"]["mAP"]}
  print(f"[{args.preset}] {args.method}: {args.rounds} rounds in {seconds:.1f} s "
        f"({seconds / args.rounds:.3f} s/round, all included) on {row['device']}", flush=True)
  return row


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=round_time.PRESETS, required=True)
  parser.add_argument("--method", default="fednml")
  parser.add_argument("--rounds", type=int, default=100)
  round_time.add_preset_size_args(parser)
  parser.add_argument("--out", help="write the row as JSON to this file")
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  row = run(args)
  round_time.write_rows(row, args.out)
  return row


if __name__ == "__main__":
  main()
