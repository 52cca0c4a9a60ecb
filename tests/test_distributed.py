"""A multi-host run (`run.py --distributed`): two processes on this machine, each with two virtual
CPU devices, joined by `jax.distributed.initialize()` (gloo collectives on CPU), compute the same
run as one process with four devices, with the training images laid out per client (each device
holds its clients' images, and each process reads only those from the dataset cache) where the
single process shares the whole set. Only process 0 writes the run's files."""

import json
import os
import socket
import subprocess
import sys

import re

import numpy as np

from conftest import REPO
from test_data_csv import make_rfmid

NUM_TRAIN = 48
TINY = ["--config=configs/demo.py", "--config.compare=", "--config.method=fedavg",
        "--config.rounds=2", "--config.data.source=rfmid", "--config.data.image_size=16",
        "--config.data.min_positives=1", "--config.labels.noise_rate=0.2",
        "--config.labels.annotation_num=2", "--config.fl.num_clients=3",
        "--config.fl.local_epochs=1", "--config.fl.batch_size=16", "--config.model.width=8",
        "--config.fl.strategy=shard"]


def _env(devices: int):
  return dict(os.environ, FEDNML_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_compute_the_single_process_run(tmp_path):
  make_rfmid(tmp_path / "rfmid", counts=(NUM_TRAIN, 12, 12))
  tiny = [*TINY, f"--config.data.path={tmp_path / 'rfmid'}"]
  single = subprocess.run([sys.executable, "run.py", *tiny, f"--workdir={tmp_path / 'single'}"],
                          cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  workdir, port = tmp_path / "multi", _free_port()
  # A cache folder of their own: process 0 builds it while process 1 waits, then both read it.
  procs = [subprocess.Popen(
      [sys.executable, "run.py", *tiny, f"--workdir={workdir}", "--distributed",
       f"--config.data.cache_dir={tmp_path / 'multi_cache'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  # Process 0 prints the table (gloo logs its connections on both).
  assert "fedavg: test" in outputs[0][0] and "fedavg: test" not in outputs[1][0]

  # The same run up to float32 reassociation: the aggregation's sums cross processes (gloo) in
  # one run and stay in one process in the other.
  def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

  multi, single_records = records(workdir), records(tmp_path / "single")
  assert [(r["round"], r["split"]) for r in multi] == [
      (r["round"], r["split"]) for r in single_records]  # written once, by process 0
  for a, b in zip(multi, single_records):
    if "client_loss" in a:
      np.testing.assert_allclose(a["client_loss"], b["client_loss"], rtol=1e-5)
    else:
      np.testing.assert_allclose(a["metrics"]["mAP"], b["metrics"]["mAP"], atol=1e-3)
  summaries = [json.loads((d / "summary.json").read_text()) for d in (workdir, tmp_path / "single")]
  np.testing.assert_allclose(summaries[0]["test_final"]["mAP"], summaries[1]["test_final"]["mAP"],
                             atol=1e-3)
  assert list((tmp_path / "multi_cache").rglob("*.array_record*"))
  # Multi-host: each device holds only its clients' images (fl.image_layout=auto), and each process
  # read only those from the cache: process 0 the 16 + 16 of clients 0 and 1 (plus the images of no
  # client, for the image statistics: none here), process 1 the 16 of client 2 and the one image a
  # padded client slot points at (client 3 is padding: 3 clients on 4 devices).
  assert [s["image_layout"] for s in summaries] == ["per_client", "shared"]
  held = [re.search(r"process (\d) of 2 holds (\d+) of (\d+) training images \(its clients'\); "
                    r"(\d+) read from disk", err) for _, err in outputs]
  assert all(held), [err[-2000:] for _, err in outputs]
  assert [tuple(map(int, m.groups())) for m in held] == [(0, 32, NUM_TRAIN, 32),
                                                          (1, 17, NUM_TRAIN, 17)]
