"""A multi-host run (`run.py --distributed`): two processes on this machine, each with two virtual
CPU devices, joined by `jax.distributed.initialize()` (gloo collectives on CPU), compute the same
run as one process with four devices, with the training images laid out per client (each device
holds its clients' images) where the single process shares the whole set. Only process 0 writes
the run's files."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO

TINY = ["--config=configs/demo.py", "--config.compare=", "--config.method=fedavg",
        "--config.rounds=2", "--config.data.embedded_train=160", "--config.data.embedded_val=60",
        "--config.data.embedded_test=80", "--config.data.min_positives=5",
        "--config.labels.noise_rate=0.2", "--config.labels.annotation_num=7",
        "--config.fl.num_clients=3", "--config.fl.local_epochs=1", "--config.fl.batch_size=16",
        "--config.model.width=8", "--config.fl.strategy=shard"]


def _env(devices: int):
  return dict(os.environ, FEDNML_NO_PROGRESS="1", JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_compute_the_single_process_run(tmp_path):
  single = subprocess.run([sys.executable, "run.py", *TINY, f"--workdir={tmp_path / 'single'}"],
                          cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]

  workdir, port = tmp_path / "multi", _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "run.py", *TINY, f"--workdir={workdir}", "--distributed",
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
  # Multi-host: each device holds only its clients' images (fl.image_layout=auto).
  assert [s["image_layout"] for s in summaries] == ["per_client", "shared"]
