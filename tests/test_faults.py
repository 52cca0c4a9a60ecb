"""Numerical faults, failed saves and bad input never damage a workdir; it stays resumable."""

import errno
import gc
import os
import signal
import sys
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fednml_jax import checkpointing, train
from fednml_jax.errors import UserError
from fednml_jax.methods.fedavg import FedAvg

from conftest import tiny_config


def _resume_ok(workdir, rounds):
  """The workdir's checkpoint loads: a rerun that requires resuming finishes from it."""
  summary = train.train_and_evaluate(tiny_config(rounds=rounds, resume="force"), str(workdir))
  assert summary["resumed_from_round"] is not None
  return summary


def test_nan_loss_stops_with_round_and_client_and_keeps_checkpoint(tmp_path, monkeypatch):
  train.train_and_evaluate(tiny_config(rounds=2, **{"checkpoint.every": 1}), str(tmp_path))
  real_loss = FedAvg.client_loss

  def nan_loss(self, phase, **kw):
    return real_loss(self, phase, **kw) * jnp.nan

  monkeypatch.setattr(FedAvg, "client_loss", nan_loss)
  with pytest.raises(UserError, match=r"round 2 on client 0.*checkpoint \(round 2\) is kept"):
    train.train_and_evaluate(tiny_config(rounds=4, resume="force"), str(tmp_path))
  monkeypatch.setattr(FedAvg, "client_loss", real_loss)
  assert _resume_ok(tmp_path, 4)["resumed_from_round"] == 2


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  real_save = ocp.CheckpointManager.save
  calls = {"n": 0}

  def flaky_save(self, step, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", flaky_save)
  with pytest.raises(UserError, match=r"No space left.*previous checkpoint \(round 1\) is intact"):
    train.train_and_evaluate(tiny_config(rounds=3, **{"checkpoint.every": 1}), str(tmp_path))
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  assert _resume_ok(tmp_path, 3)["resumed_from_round"] == 1


def test_save_failing_in_the_background_is_reported_and_the_previous_checkpoint_kept(
    tmp_path, monkeypatch):
  """Saves are written asynchronously: a write that fails after `save` returned (here the second
  save's, whose files never appear) is reported at the next save, naming its round."""
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
  calls = {"saves": 0, "failing": False}

  def save(self, step, *args, **kwargs):
    calls["saves"] += 1
    if calls["saves"] == 2:
      calls["failing"] = True
      return True
    return real_save(self, step, *args, **kwargs)

  def wait(self):
    if calls["failing"]:
      calls["failing"] = False
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
  with pytest.raises(UserError, match=r"after round 1 \(No space left.*previous checkpoint "
                                      r"\(round 1\) is intact"):
    train.train_and_evaluate(tiny_config(rounds=3, **{"checkpoint.every": 1}), str(tmp_path))
  assert calls["saves"] == 2  # the run stopped at its third save, before writing it
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", real_wait)
  assert _resume_ok(tmp_path, 3)["resumed_from_round"] == 1


@pytest.mark.parametrize("overrides", [
    {"labels.noise_rate": 1.5},
    {"labels.annotation_num": 99},
    {"fl.num_clients": 10_000},
    {"method": "nope"},
    {"data.source": "npz", "data.path": "/does/not/exist.npz"},
])
def test_bad_input_on_an_existing_run_leaves_it_resumable(tmp_path, overrides):
  train.train_and_evaluate(tiny_config(rounds=1), str(tmp_path))
  before = sorted(p.name for p in tmp_path.rglob("*"))
  with pytest.raises(UserError):
    train.train_and_evaluate(tiny_config(rounds=1, resume="force", **overrides), str(tmp_path))
  assert sorted(p.name for p in tmp_path.rglob("*")) == before
  _resume_ok(tmp_path, 2)


def test_class_without_test_positives_is_reported_not_fatal(tmp_path):
  rng = np.random.default_rng(0)
  labels = (rng.random((120, 3)) < 0.4).astype(np.uint8)
  test_labels = (rng.random((30, 3)) < 0.4).astype(np.uint8)
  test_labels[:, 2] = 0  # class 2 never occurs in the test split
  np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 255, (120, 16, 16), np.uint8),
           train_labels=labels, test_images=rng.integers(0, 255, (30, 16, 16), np.uint8),
           test_labels=test_labels)
  cfg = tiny_config(rounds=1, **{"data.source": "npz", "data.path": str(tmp_path / "d.npz"),
                                 "labels.annotation_num": 3})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert summary["test_final"]["classes_skipped"] == 1
  assert summary["test_final"]["classes_evaluated"] == 2
  assert summary["test_final"]["mAP"] is not None


def test_ctrl_c_inside_a_checkpoint_call_is_raised_once_the_call_returns():
  """A Ctrl-C that lands inside Orbax's save or wait (`ctrl_c_deferred`) is held until the call
  has returned, so the run never exits under Orbax's writing thread; then it is raised as usual."""
  # A shell's background job (as in CI) starts with SIGINT ignored: give this test the default.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    steps = []
    with pytest.raises(KeyboardInterrupt):
      with checkpointing.ctrl_c_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler here: recorded, not raised
        steps.append("the call returned")
      steps.append("not reached")
    assert steps == ["the call returned"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
  finally:
    signal.signal(signal.SIGINT, previous)


def _raised_inside_a_gc_callback(error=KeyboardInterrupt):
  """`error` raised while Python runs a garbage-collection callback (JAX registers one), as a
  Ctrl-C does at random under load: Python cannot raise it there and reports it as ignored."""
  def failing(phase, info):
    if phase == "start":
      raise error

  gc.callbacks.append(failing)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(failing)


def test_a_ctrl_c_python_drops_is_raised_at_the_next_safe_point(capsys):
  reported = []
  previous = sys.unraisablehook
  sys.unraisablehook = reported.append  # stands for Python's default, which prints
  try:
    with pytest.raises(KeyboardInterrupt):
      with checkpointing.ctrl_c_never_lost() as raise_lost_ctrl_c:
        _raised_inside_a_gc_callback()  # returns: Python dropped the interrupt
        raise_lost_ctrl_c()
    with pytest.raises(KeyboardInterrupt):  # not raised inside: the block's end raises it
      with checkpointing.ctrl_c_never_lost():
        _raised_inside_a_gc_callback()
    with checkpointing.ctrl_c_never_lost() as raise_lost_ctrl_c:
      _raised_inside_a_gc_callback(ZeroDivisionError)  # other errors reach the usual hook
      raise_lost_ctrl_c()
    assert [r.exc_type for r in reported] == [ZeroDivisionError]
    assert sys.unraisablehook == reported.append  # restored
    _raised_inside_a_gc_callback()  # outside the block, Python's own behaviour: reported, lost
    assert reported[-1].exc_type is KeyboardInterrupt
  finally:
    sys.unraisablehook = previous
  assert capsys.readouterr().err == ""


def test_a_run_stops_after_a_ctrl_c_python_dropped_and_resumes(tmp_path, monkeypatch):
  """Before this was handled, a sweep worker whose Ctrl-C landed in JAX's garbage-collection
  callback trained on to the end of its run (1000 rounds in the sweep's Ctrl-C test)."""
  real_run_round = train.Experiment.run_round

  def run_round_interrupted_in_gc(self, rnd, *args):
    result = real_run_round(self, rnd, *args)
    if rnd == 1:
      _raised_inside_a_gc_callback()
    return result

  monkeypatch.setattr(train.Experiment, "run_round", run_round_interrupted_in_gc)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(rounds=4, **{"checkpoint.every": 1}), str(tmp_path))
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))  # the last save was waited for
  assert checkpointing.Checkpointer(str(tmp_path), 1, 3).latest_round() == 2  # round 1 finished
  assert not (tmp_path / "summary.json").exists() and not (tmp_path / ".running").exists()
  monkeypatch.setattr(train.Experiment, "run_round", real_run_round)
  assert _resume_ok(tmp_path, 4)["resumed_from_round"] == 2
