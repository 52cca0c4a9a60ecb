"""Resume: a run interrupted and resumed equals an uninterrupted one; unsafe resumes are refused."""

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from fednml_jax import train
from fednml_jax.checkpointing import WorkdirInUse
from fednml_jax.errors import ConfigError, UserError

from conftest import REPO, interrupt_then_resume, tiny_config


def _rounds_in(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["round"] for line in f if '"client_loss"' in line]


def test_interrupted_and_resumed_run_equals_straight_run(tmp_path, monkeypatch):
  straight = train.train_and_evaluate(tiny_config(rounds=4, **{"checkpoint.every": 2}),
                                      str(tmp_path / "straight"))
  # Interrupted as round 3 starts: the checkpoint after round 2 is the last (every 2 rounds).
  resumed = interrupt_then_resume(
      lambda: tiny_config(rounds=4, **{"checkpoint.every": 2}), tmp_path / "resumed", 3,
      monkeypatch)
  assert resumed["resumed_from_round"] == 2
  for key in ("test_final", "test_at_best_val", "best_val_round", "val_at_best"):
    assert resumed[key] == straight[key]  # bit-identical on CPU
  # metrics.jsonl holds each round once: the records of the lost round 2 were dropped.
  assert _rounds_in(tmp_path / "resumed") == [0, 1, 2, 3]


def test_changed_config_is_refused_with_the_differing_keys(tmp_path):
  train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  with pytest.raises(ConfigError, match=r"optim\.lr"):
    train.train_and_evaluate(tiny_config(rounds=1, **{"optim.lr": 0.1}), str(tmp_path))
  with pytest.raises(UserError, match="fresh"):
    train.train_and_evaluate(tiny_config(rounds=1, resume="fresh"), str(tmp_path))
  # Non-result keys may change; force accepts a result key.
  train.train_and_evaluate(tiny_config(rounds=1, **{"checkpoint.keep": 3}), str(tmp_path))
  forced = train.train_and_evaluate(tiny_config(rounds=2, resume="force"), str(tmp_path))
  assert forced["resumed_from_round"] == 1


def test_require_without_checkpoint_is_refused(tmp_path):
  with pytest.raises(UserError, match="no checkpoint"):
    train.train_and_evaluate(tiny_config(resume="require"), str(tmp_path))


def test_sigkill_during_training_then_resume(tmp_path):
  """Kill the process (SIGKILL) mid-run; rerunning the same command completes the run."""
  workdir = tmp_path / "run"
  cmd = [sys.executable, "run.py", "--config=configs/demo.py", "--config.compare=",
         f"--workdir={workdir}",
         "--config.rounds=6", "--config.checkpoint.every=1", "--config.data.embedded_train=200",
         "--config.data.embedded_val=60", "--config.data.embedded_test=80",
         "--config.model.width=8", "--config.eval.every=3"]
  env = dict(os.environ, FEDNML_NO_PROGRESS="1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpts.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "summary.json").exists()
  assert json.loads((workdir / ".running").read_text())["pid"] == proc.pid  # left by the kill
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"taking over the lock of process {proc.pid}, which no longer runs" in done.stderr
  assert not (workdir / ".running").exists()
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_round"] >= 2
  assert _rounds_in(workdir) == list(range(6))


def _process_state(pid):
  with open(f"/proc/{pid}/stat") as f:
    return f.read().rsplit(")", 1)[1].split()[0]


def test_a_workdir_in_use_is_refused_and_a_dead_process_s_lock_taken_over(tmp_path):
  """`.running` names the process training a workdir: a live one (here: this test's parent
  process) or one on another host makes a second run refuse the folder before touching it; one of
  this host that no longer runs (exited but not yet reaped, or gone) is taken over, and so is an
  empty lock once it is old enough that its writer must have been killed while writing it (the
  sweep-worker test hit that window); a finished or failed run leaves no lock behind."""
  lock = tmp_path / ".running"

  def held_by(host, pid):
    lock.write_text(json.dumps({"host": host, "pid": pid, "since": "2026-11-23 08:00:00 UTC"}))

  held_by(platform.node(), os.getppid())
  with pytest.raises(WorkdirInUse, match=rf"is in use: process {os.getppid()} on this host \(since "
                     r"2026-11-23 08:00:00 UTC\) is training the run there"):
    train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  held_by("gpu-node-7", 4242)
  with pytest.raises(WorkdirInUse, match=rf"process 4242 on host gpu-node-7 .* delete {lock}"):
    train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == [".running"]  # nothing else was written
  exited = subprocess.Popen(["true"])
  while _process_state(exited.pid) != "Z":  # exited, not yet reaped: a zombie
    time.sleep(0.01)
  held_by(platform.node(), exited.pid)
  summary = train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  assert summary["rounds"] == 1 and not lock.exists()
  exited.wait()  # reaped: its pid names no process
  held_by(platform.node(), exited.pid)
  train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  assert not lock.exists()
  lock.write_text("")  # created, and its writer killed before it wrote anything
  with pytest.raises(WorkdirInUse, match="is in use: another process is training the run there"):
    train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))  # it may be writing it now
  minute_ago = time.time() - 60
  os.utime(lock, (minute_ago, minute_ago))
  train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  assert not lock.exists()
  with pytest.raises(ConfigError):  # a failing run releases the folder too
    train.train_and_evaluate(tiny_config(rounds=1, **{"optim.lr": 0.5}), str(tmp_path))
  assert not lock.exists()


def test_config_keys_added_later_do_not_block_resuming():
  from fednml_jax import checkpointing
  new = tiny_config().to_dict()
  old = tiny_config().to_dict()
  del old["aggregation"]  # a workdir written before the key existed: it had the default
  old["retired_key"] = 1  # a key the schema no longer has
  assert checkpointing.config_differences(old, new) == []
  new["aggregation"] = "krum"
  assert checkpointing.config_differences(old, new) == ["aggregation"]
