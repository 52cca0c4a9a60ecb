r"""Runs one federated experiment.

  python run.py --config=configs/demo.py --workdir=/tmp/demo
  python run.py --config=configs/rfmid64.py --workdir=runs/rfmid --config.method=fedavg \
      --config.labels.noise_rate=0.4 --config.seed=1

Any config value can be overridden with --config.KEY=VALUE (see fednml_jax/config.py).
Errors caused by the input (config, data, workdir) are printed as one paragraph, exit code 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fednml_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for config.json, metrics.jsonl, "
                               "summary.json (and checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host run: call jax.distributed.initialize() and split the clients "
    "over the devices of every process (start the same command once per host).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0 (default: detected "
    "from the cluster environment).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many "
                                      "processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index "
                                   "(default: detected).")
_COMPILE_CACHE = cli.define_compile_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fednml_jax import distributed, train
  from fednml_jax.errors import UserError
  import jax
  cli.hide_library_info_logs()
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX %s on %s; compilation cache: %s", jax.__version__, jax.devices(),
               cli.enable_compile_cache(_COMPILE_CACHE.value, _WORKDIR.value))
  try:
    summaries = train.run_comparison(_CONFIG.value, _WORKDIR.value)
  except UserError as err:
    print(f"\nerror: {err}", file=sys.stderr)
    sys.exit(2)
  if not distributed.is_primary():
    return
  print()
  print(train.summary_table(summaries))
  seconds = sum(s["seconds"] for s in summaries)
  print(f"\n{len(summaries)} run(s) of {summaries[0]['rounds']} rounds in {seconds:.1f} s; "
        f"summary.json and metrics.jsonl under {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(
      "python run.py --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]; valid keys "
      "are in fednml_jax/config.py.", "the configs are in configs/ (e.g. "
      "--config=configs/demo.py)"))
