r"""Seconds per round of each client-parallel strategy on this machine's backend.

  python benchmarks/strategy_time.py [--config=configs/demo.py] [--rounds=3] [--out=FILE.json]

Builds one Experiment per strategy from the same config, runs one round to compile, then times
`--rounds` rounds (block_until_ready). Prints a table and optionally writes JSON rows
{strategy, backend, devices, compile_seconds, seconds_per_round}.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from timing import load_config, time_rounds  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config file.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per strategy.")
_STRATEGIES = flags.DEFINE_list("strategies", ["loop", "vmap", "shard"], "Strategies to time.")
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here.")


def time_strategy(config, strategy, rounds):
  config = config.copy_and_resolve_references()
  config.fl.strategy = strategy
  return time_rounds(config, rounds)


def main(argv):
  del argv
  config = load_config(_CONFIG.value)
  rows = []
  for strategy in _STRATEGIES.value:
    compile_s, per_round = time_strategy(config, strategy, _ROUNDS.value)
    rows.append({"strategy": strategy, "backend": jax.default_backend(),
                 "devices": jax.device_count(), "config": _CONFIG.value,
                 "compile_seconds": round(compile_s, 2), "seconds_per_round": round(per_round, 3)})
  print(f"{'strategy':10s}{'first round (s)':>18s}{'s / round':>12s}")
  for r in rows:
    print(f"{r['strategy']:10s}{r['compile_seconds']:18.2f}{r['seconds_per_round']:12.3f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
