"""The run contract through `python run.py`: outputs, the results table, and clear errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, shared_file

from fednml_jax import cli

SMALL = ["--config.data.embedded_train=200", "--config.data.embedded_val=60",
         "--config.data.embedded_test=100", "--config.model.width=8"]


def run(args, workdir, timeout=300):
  env = dict(os.environ, FEDNML_NO_PROGRESS="1")
  return subprocess.run([sys.executable, "run.py", f"--workdir={workdir}", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_compares_methods_and_prints_one_table(tmp_path):
  done = run(["--config=configs/demo.py", "--config.rounds=2", "--config.fednml.warmup_rounds=1",
              *SMALL], tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "class-prior predictor" in done.stdout
  assert "fedavg: test" in done.stdout and "fednml: test" in done.stdout
  for method in ("fedavg", "fednml"):
    assert json.loads((tmp_path / method / "summary.json").read_text())["method"] == method
  # The project's INFO lines show; Orbax's dozen per checkpoint save do not.
  assert "train.py" in done.stderr and "checkpoint_manager.py" not in done.stderr


def test_single_run_writes_the_contract_files(tmp_path):
  done = run(["--config=configs/demo.py", "--config.compare=", "--config.rounds=2", *SMALL],
             tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "class-prior predictor" in done.stdout and "mAP" in done.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["rounds"] == 2 and config["method"] == "fedavg"
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in records if r["split"] in ("val", "test")]
  assert {r["round"] for r in evals} == {1} and {"mAP", "BAcc"} <= set(evals[0]["metrics"])
  summary = json.loads((tmp_path / "summary.json").read_text())
  for key in ("method", "dataset", "rounds", "seed", "seconds", "best_val_round", "test_final",
              "test_at_best_val"):
    assert key in summary
  for block in ("test_final", "test_at_best_val"):
    assert set(summary[block]) >= {"mAP", "F1", "Recall", "BAcc", "Precision", "AUROC"}


@pytest.mark.parametrize("args, phrase", [
    (["--config.fl.num_clientz=3"], "num_clients"),
    (["--config.fl.num_clients=abc"], "invalid literal"),
    (["--config.method=fedfoo"], "Unknown method"),
    (["--config.labels.annotation_num=11"], "outside 1..10"),
    (["--config.labels.annotation_num=0"], "at least 1"),
    (["--config.labels.noise_rate=1.0"], "[0, 1)"),
    (["--config.fl.num_clients=5000"], "exceeds the 1200 training samples"),
    (["--config.data.source=npz", "--config.data.path=/nonexistent.npz"], "No .npz file"),
    (["--config.data.source=rfmid", "--config.data.path=/nonexistent"], "RFMiD"),
])
def test_bad_input_gets_one_paragraph_and_exit_code_2(tmp_path, args, phrase):
  done = run(["--config=configs/demo.py", *args], tmp_path / "w", timeout=120)
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert phrase in done.stderr


def test_missing_config_file_and_unwritable_workdir(tmp_path):
  done = run(["--config=configs/nope.py"], tmp_path, timeout=60)
  assert done.returncode == 2 and "does not exist" in done.stderr
  blocker = tmp_path / "file"
  blocker.write_text("")
  done = run(["--config=configs/demo.py"], blocker / "sub", timeout=60)
  assert done.returncode == 2 and "Cannot write to the workdir" in done.stderr
  assert "Traceback" not in done.stderr


def test_fedavg_on_shared_rfmid_beats_the_class_prior(tmp_path):
  """FedAvg, 0% noise, all classes annotated, on real fundus images (ALGORITHMS.md §1 data)."""
  path = shared_file("rfmid_dev_64px.npz")
  done = run(["--config=configs/rfmid64.py", f"--config.data.path={path}",
              "--config.labels.noise_rate=0.0", "--config.labels.annotation_num=9",
              "--config.rounds=12", "--config.fl.local_epochs=2", "--config.eval.every=4"],
             tmp_path, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  prior = summary["test_class_prior"]["mAP"]
  assert prior == pytest.approx(0.18, abs=0.03)
  assert summary["test_at_best_val"]["mAP"] > prior + 0.10, summary


@pytest.fixture
def restore_cache_config():
  import jax
  saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
  yield jax
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_enable_compilation_cache", saved[1])


def test_compile_cache_defaults_to_the_workdir_and_honours_the_environment(
    restore_cache_config, monkeypatch, tmp_path):
  jax = restore_cache_config
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert cli.enable_compile_cache("auto", str(tmp_path)) == str(tmp_path / "xla_cache")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla_cache")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert cli.enable_compile_cache("auto", str(tmp_path)) == "/elsewhere"
  assert cli.enable_compile_cache(str(tmp_path / "mine"), str(tmp_path)) == str(tmp_path / "mine")
  assert cli.enable_compile_cache("none", str(tmp_path)) is None
  assert not jax.config.jax_enable_compilation_cache
