r"""Round time as the number of clients grows, with a fixed number of samples per client.

  python benchmarks/scaling.py [--clients=4,8,16,32,64,128,256] [--per_client=32] \
      [--strategy=auto] [--model=small_cnn] [--local_epochs=1] [--rounds=3] [--out=FILE.json]

For each client count K: FedAvg on the embedded data (32×32 grey digit mosaics) with K IID clients
of `--per_client` training images each (K·per_client images in all), one round to compile, then `--rounds` timed rounds
(block_until_ready). Cost that is linear in K shows as a constant `seconds_per_client`. A count
whose round does not fit in device memory is reported as `out_of_memory` and ends the sweep (the
first such K is where memory is full). Rows: {clients, strategy, backend, devices, model,
images_per_round, compile_seconds, seconds_per_round, seconds_per_client, images_per_second,
status}.

Batched independent runs (a run axis) are timed by `benchmarks/run_batching.py`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from fednml_jax.config import base_config  # noqa: E402
from fednml_jax.engine.strategies import resolve_strategy  # noqa: E402
from timing import time_rounds  # noqa: E402

_CLIENTS = flags.DEFINE_list("clients", ["4", "8", "16", "32", "64", "128", "256"],
                             "Client counts to time, in increasing order.")
_PER_CLIENT = flags.DEFINE_integer("per_client", 32, "Training images per client.")
_STRATEGY = flags.DEFINE_string("strategy", "auto", "fl.strategy: auto | vmap | shard | loop.")
_MODEL = flags.DEFINE_string("model", "small_cnn", "model.name.")
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 1, "fl.local_epochs.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per client count.")
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON here.")


def scaling_config(num_clients: int):
  c = base_config()
  c.method = "fedavg"
  c.data.source = "embedded"
  c.data.embedded_train = num_clients * _PER_CLIENT.value
  c.data.embedded_val = 64
  c.data.embedded_test = 64
  c.data.min_positives = 1
  c.fl.num_clients = num_clients
  c.fl.local_epochs = _LOCAL_EPOCHS.value
  c.fl.batch_size = 32
  c.fl.strategy = _STRATEGY.value
  c.model.name = _MODEL.value
  return c


def main(argv):
  del argv
  rows = []
  for clients in [int(k) for k in _CLIENTS.value]:
    config = scaling_config(clients)
    row = {"clients": clients, "strategy": resolve_strategy(_STRATEGY.value), "backend": jax.default_backend(),
           "devices": jax.device_count(), "model": _MODEL.value,
           "images_per_round": clients * _PER_CLIENT.value * _LOCAL_EPOCHS.value}
    try:
      compile_s, per_round = time_rounds(config, _ROUNDS.value)
    except Exception as err:  # noqa: BLE001 -- XLA reports exhausted memory as a runtime error
      if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
        raise
      rows.append(dict(row, status="out_of_memory"))
      print(f"{clients} clients: out of device memory; stopping", flush=True)
      break
    rows.append(dict(row, status="ok", compile_seconds=round(compile_s, 2),
                     seconds_per_round=round(per_round, 4),
                     seconds_per_client=round(per_round / clients, 5),
                     images_per_second=round(row["images_per_round"] / per_round, 1)))
    print(f"{clients:6d} clients: compile {compile_s:7.2f} s, {per_round:8.3f} s/round, "
          f"{per_round / clients * 1e3:8.2f} ms/client", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
