"""Orbax checkpoints of a run, and the rules for resuming one.

A checkpoint after round r holds everything rounds r+1… depend on: the global variables (server
state; client optimizers are re-initialised every round, so none survive a round), the method's
host state (label tables, class counts, …), the evaluation history, and the simulation's host arrays
(client partition, corruption mask, annotated classes, observed labels). RNG keys are not stored:
every stream is `fold_in(seed, round)`, so resuming at round r replays the same randomness.
The simulation arrays are recomputed from the seed on resume and must equal the saved ones, which
catches a code change that would silently resume a different experiment.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a kill during a
save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fednml_jax import config as config_lib
from fednml_jax.errors import ConfigError, UserError

# Keys that do not change a run's results: a resumed run may differ in these freely.
NON_RESULT_KEYS = ("resume", "compare", "checkpoint.every", "checkpoint.keep",
                   "eval.batch_size", "plots", "fl.image_layout")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _saved_rounds(workdir: str) -> list[int]:
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _newest_saved_round(workdir: str):
  """The round of the newest complete checkpoint (Orbax names a folder by its round only once the
  save is complete), or None."""
  rounds = _saved_rounds(workdir)
  return rounds[-1] if rounds else None


def config_differences(old: dict, new: dict) -> list[str]:
  """Dotted keys whose values differ between a workdir's config and a new one.

  Ignores NON_RESULT_KEYS. Only keys of the current schema count: a key the old config lacks (it
  was added to fednml_jax later) equals the schema default, so older workdirs stay resumable, and
  a key the schema no longer has is ignored.
  """
  defaults = json.loads(json.dumps(config_lib.flatten(config_lib.base_config()), default=str))
  old_flat = config_lib.flatten(old)
  new_flat = json.loads(json.dumps(config_lib.flatten(new), default=str))
  return sorted(k for k in new_flat
                if k not in NON_RESULT_KEYS and old_flat.get(k, defaults.get(k)) != new_flat[k])


def check_resume(config, workdir: str) -> bool:
  """Decides whether to resume from `workdir`, per `config.resume`; refuses unsafe cases."""
  mode = config.resume
  rounds = _saved_rounds(workdir)
  if not rounds:
    if mode == "require":
      raise UserError(f"--config.resume=require, but {workdir} holds no checkpoint to resume.")
    return False
  if mode == "fresh":
    raise UserError(f"{workdir} already holds a run (checkpoint at round {rounds[-1]}) and "
                    "--config.resume=fresh refuses to overwrite it. Use another --workdir, or "
                    "resume it with --config.resume=auto.")
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      old = json.load(f)
    differing = config_differences(old, config.to_dict())
    if differing and mode != "force":
      shown = ", ".join(f"{k} ({config_lib.flatten(old).get(k)!r} → "
                        f"{config_lib.flatten(config.to_dict()).get(k)!r})" for k in differing[:8])
      raise ConfigError(
          f"{workdir} holds a run with a different config, so resuming it would mix two "
          f"experiments. Differing keys: {shown}. Use another --workdir for a new run, or pass "
          "--config.resume=force to continue this one under the new values.")
    if differing:
      logging.warning("resuming %s under changed keys %s (resume=force)", workdir, differing)
  return True


LOCK_FILE = ".running"  # in a run's workdir while a process trains it


class WorkdirInUse(UserError):
  """Another process is training the run in this workdir."""


# A lock file that cannot be read is normally one being written this instant; one still unreadable
# this many seconds after it was created was left by a process killed between creating and writing it.
UNREADABLE_LOCK_SECONDS = 10.0


def _process_alive(pid: int) -> bool:
  """Whether `pid` names a process of this host that still runs (an exited process its parent has
  not yet reaped, a zombie, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  try:
    with open(f"/proc/{pid}/stat") as f:  # "pid (command) state ...": Linux only
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


@contextlib.contextmanager
def workdir_lock(workdir: str, shared_by_processes: bool = False):
  """Holds `workdir/.running` (host, pid, start time) while a run trains there, so that a second
  `run.py` or sweep started on the same folder is refused (`WorkdirInUse`) instead of writing the
  same checkpoints and logs. A lock left by a process of this host that no longer runs (killed) is
  taken over, and so is one still empty or unreadable `UNREADABLE_LOCK_SECONDS` after it was
  created (its writer was killed between creating and writing it); one from another host is not
  (it may still run): its message says to delete the file once that run is known to be gone. `shared_by_processes`: a multi-host run, whose processes
  all write to the workdir, takes no lock."""
  if shared_by_processes:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": platform.node(), "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          holder = json.load(f)
      except FileNotFoundError:
        continue  # released meanwhile
      except (OSError, ValueError):
        holder = None
      if not isinstance(holder, dict):  # being written, or its writer was killed while writing
        try:
          age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
          continue
        if age > UNREADABLE_LOCK_SECONDS:
          logging.warning("%s: taking over an unreadable lock, %.0f s old, left by a process "
                          "killed while writing it", workdir, age)
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
          continue
        holder = {}
      pid, host = holder.get("pid"), holder.get("host")
      if host == me["host"] and isinstance(pid, int) and (
          pid == me["pid"] or not _process_alive(pid)):
        logging.warning("%s: taking over the lock of process %d, which no longer runs", workdir,
                        pid)
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      who = (f"process {pid} on {'this host' if host == me['host'] else f'host {host}'} "
             f"(since {holder.get('since')})" if pid is not None else "another process")
      raise WorkdirInUse(
          f"{workdir} is in use: {who} is training the run there, and two processes would "
          f"overwrite each other's checkpoints. Wait for it to finish, or stop it; if it no "
          f"longer runs (its machine went down), delete {path}.") from None
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      with open(path) as f:
        mine = json.load(f).get("pid") == me["pid"]
      if mine:
        os.remove(path)


def truncate_jsonl(path: str, first_round: int) -> None:
  """Drops records of rounds ≥ first_round (written after the checkpoint a run resumes from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["round"] < first_round:
        kept.append(line)
    except (ValueError, KeyError):
      continue  # a line cut short by a kill
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


@contextlib.contextmanager
def ctrl_c_deferred():
  """Holds a Ctrl-C (SIGINT) that arrives inside the block until the block has ended, then raises
  it: Orbax's save and wait calls, interrupted half-way, leave its writing threads running into
  the interpreter's shutdown. Only the main thread receives signals; elsewhere this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
      previous(signal.SIGINT, received[0])  # Python's default handler raises KeyboardInterrupt
    elif received and previous == signal.SIG_DFL:
      signal.raise_signal(signal.SIGINT)  # the process ends as it would have


@contextlib.contextmanager
def ctrl_c_never_lost():
  """Yields `raise_lost_ctrl_c`, which raises a KeyboardInterrupt that Python dropped inside the
  block; the block's end raises it too. Python cannot raise an exception out of a garbage-collection
  callback, a `__del__` or a weakref callback: it prints "Exception ignored in ..." and goes on.
  JAX runs such a callback at every collection, so a Ctrl-C (SIGINT) landing in one was lost and
  the run trained on (found on a loaded 2-core machine: a sweep worker told to stop by Ctrl-C or
  by its parent's death ran to its end). Inside the block such an interrupt is recorded instead of
  printed, for the caller to raise at its next safe point (a run: the next round's start)."""
  lost = []
  previous = sys.unraisablehook

  def record_ctrl_c(unraisable):
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
      lost.append(True)
    else:
      previous(unraisable)

  def raise_lost_ctrl_c():
    if lost:
      lost.clear()
      raise KeyboardInterrupt

  sys.unraisablehook = record_ctrl_c
  try:
    yield raise_lost_ctrl_c
  finally:
    sys.unraisablehook = previous
  raise_lost_ctrl_c()


class Checkpointer:
  """Saves and restores run state with an orbax `CheckpointManager` under `workdir/checkpoints`.

  Saves are asynchronous: `save` returns once the state is copied off the device (ResNet-18's
  45 MB of variables, a save every second on the project's CPU: 0.20–0.33 s blocking when saves
  were synchronous, 0.02–0.05 s now), and Orbax writes the files in a background thread while the
  next rounds run. A save that fails there is reported at the next `save` or at `close` (a
  `UserError` naming its round); the previous checkpoint stays intact either way, since Orbax
  commits a checkpoint by renaming its finished folder. What a save holds is copied when it is
  called (host arrays included), so later rounds cannot change it.
  """

  def __init__(self, workdir: str, every: int, keep: int):
    self.every = every
    self.workdir = workdir
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
    self._writing = None  # the `next_round` of the save being written, if any
    self._failed = None  # a failed save's error, seen by `latest_round`, raised again later

  def latest_round(self):
    """The round of the newest complete checkpoint (None if none), once any save under way has
    ended; a failed save is logged here and raised again at `close`."""
    try:
      self.finish_writing()
    except UserError as err:
      self._failed = err
      logging.warning("%s", err)
    return _newest_saved_round(self.workdir)

  def save(self, next_round: int, variables, method_state, host_arrays, history, seconds):
    self.finish_writing()
    state = {"variables": variables, "method_state": _as_arrays(method_state),
             "host": _as_arrays(host_arrays)}
    meta = {"next_round": next_round, "seconds": seconds,
            "history": {str(k): v for k, v in history.items()}}
    # Marked as under way before it starts, and cleared only once it has ended, so that `close`
    # waits for it whatever interrupts the run (else the process would exit under Orbax's writing
    # thread, which then fails); Ctrl-C waits for Orbax's calls to return (`ctrl_c_deferred`).
    self._writing = next_round
    try:
      with ctrl_c_deferred():
        self.manager.save(next_round, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except OSError as err:
      self._writing = None
      raise self._save_failed(next_round, err) from None

  def finish_writing(self):
    """Waits for the save under way; raises a `UserError` if it failed."""
    if self._failed is not None:
      failed, self._failed = self._failed, None
      raise failed
    if self._writing is None:
      return
    try:
      with ctrl_c_deferred():
        self.manager.wait_until_finished()
    except OSError as err:
      next_round, self._writing = self._writing, None
      raise self._save_failed(next_round, err) from None
    self._writing = None

  def _save_failed(self, next_round: int, err: OSError) -> UserError:
    return UserError(
        f"Could not save the checkpoint after round {next_round - 1} ({err.strerror or err}); "
        f"the previous checkpoint (round {_newest_saved_round(self.workdir)}) is intact. Free "
        "disk space and rerun the same command to resume.")

  def restore(self, variables, method_state, host_arrays):
    """(next_round, variables, method_state, history, seconds), or None when there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = {"variables": variables, "method_state": _as_arrays(method_state),
              "host": host_arrays}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax raises many types for damaged or incompatible files
      raise UserError(f"The checkpoint at round {step} in {self.manager.directory} cannot be "
                      f"restored ({type(err).__name__}: {err}). Move it away to resume from an "
                      "earlier one, or use a fresh --workdir.") from None
    state, meta = restored["state"], restored["meta"]
    for name, saved in state["host"].items():
      if not np.array_equal(np.asarray(saved), np.asarray(host_arrays[name])):
        raise UserError(
            f"The checkpoint in {self.manager.directory} was made with a different client "
            f"simulation ({name} differs), e.g. by another version of fednml_jax. Use a fresh "
            "--workdir.")
    method_state = {k: np.asarray(v) for k, v in state["method_state"].items()}
    history = {int(k): v for k, v in meta["history"].items()}
    return meta["next_round"], state["variables"], method_state, history, meta["seconds"]

  def close(self):
    """Waits for the save under way (raising a `UserError` if it failed) and closes."""
    try:
      self.finish_writing()
    finally:
      self.manager.close()


def _as_arrays(tree: dict) -> dict:
  """Copies: an asynchronous save must not see later changes to the caller's arrays."""
  return {k: np.array(v) for k, v in tree.items()}
