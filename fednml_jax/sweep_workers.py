"""A sweep's runs in worker processes, one run at a time per worker, each worker on one GPU
(`python -m fednml_jax.sweep --workers=N [--workers_per_gpu=K]`).

Worker `i` (1-based) is a fresh Python process (the `spawn` start method) that sees one GPU: with
K = 1 the `i`-th entry of the parent's `CUDA_VISIBLE_DEVICES` (GPU `i − 1` when that variable is
unset); with K > 1, workers 1..K share the first GPU, K+1..2K the second, and so on, each then
taking 0.9/K of its GPU's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`, unless the user set it) where
JAX alone would take 75%: for models too small to keep a GPU busy. It runs
`train.train_and_evaluate` on each run the parent sends it and answers with the run's summary or
its error; the parent hands the next run of the sweep to whichever worker is free, so runs of
different lengths keep every GPU busy. The parent never starts a JAX backend (it would take GPU
memory the workers need). On a machine without GPUs the workers share the CPU cores; that pays
only where one run leaves cores idle (see docs/performance.md).

Failures stay per run, as in a sweep run in one process: a `UserError` fails its run; an unexpected
exception fails its run with the traceback printed; a worker that dies (killed, out of memory)
fails its run, which resumes from its last checkpoint the next time the sweep is run, and a fresh
worker takes its place. Ctrl-C reaches the workers too: each waits for its run's checkpoint write
and exits, and the parent waits for them before it writes the tables. If the sweep's own process
dies (killed), each worker gets a SIGINT (Linux's parent-death signal) and stops the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from multiprocessing import connection

from fednml_jax.errors import ConfigError, UserError

DEVICE_VARIABLE = "CUDA_VISIBLE_DEVICES"
PR_SET_PDEATHSIG = 1  # prctl(2)
SHUTDOWN_SECONDS = 120.0  # how long the parent waits for a worker to finish its checkpoint writes


def worker_devices(workers: int, per_gpu: int = 1) -> list[str]:
  """The `CUDA_VISIBLE_DEVICES` value of each worker: workers 1..per_gpu share the first GPU, the
  next per_gpu the second, and so on."""
  gpus_needed = -(-workers // per_gpu)
  visible = os.environ.get(DEVICE_VARIABLE)
  ids = ([str(i) for i in range(gpus_needed)] if visible is None
         else [d.strip() for d in visible.split(",") if d.strip()])
  if len(ids) < gpus_needed:
    raise ConfigError(
        f"--workers={workers} with --workers_per_gpu={per_gpu} needs {gpus_needed} GPUs, but "
        f"{DEVICE_VARIABLE}={visible!r} makes {len(ids)} visible: use at most "
        f"--workers={len(ids) * per_gpu}, more workers per GPU, or show more GPUs.")
  return [ids[i // per_gpu] for i in range(workers)]


def worker_environment(device: str, per_gpu: int) -> dict:
  """The variables a worker starts with: its GPU and, when several workers share one, each its
  share of the GPU's memory (JAX takes 75% of it by default; a fraction set by the user stays)."""
  env = {DEVICE_VARIABLE: device}
  if per_gpu > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / per_gpu:.3f}"
  return env


def serve(conn, compile_cache: str | None, cache_workdir: str) -> None:
  """A worker's main loop: (index, workdir, config) in; ("done", index, summary),
  ("failed", index, message) or ("crashed", index, traceback) out; None ends it."""
  os.environ["FEDNML_NO_PROGRESS"] = "1"  # N progress bars on one terminal would be unreadable
  try:
    _interrupt_when_orphaned()
    import jax  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    # tqdm's default lock is a multiprocessing semaphore, which the exit below would leak.
    tqdm.set_lock(threading.RLock())

    from fednml_jax import cli, train  # noqa: PLC0415
    if compile_cache is not None:
      cli.enable_compile_cache(compile_cache, cache_workdir)
    devices = jax.devices()
    conn.send(("ready", jax.default_backend(), devices[0].device_kind, len(devices)))
    while (job := conn.recv()) is not None:
      index, workdir, config = job
      try:
        reply = ("done", index, train.train_and_evaluate(config, workdir))
      except UserError as err:
        reply = ("failed", index, str(err))
      except Exception:  # noqa: BLE001  (a bug fails its run; the other workers go on)
        reply = ("crashed", index, traceback.format_exc())
      conn.send(reply)
  except KeyboardInterrupt:
    # Ctrl-C: the run has waited for its checkpoint write on the way out. Exit now rather than
    # wait for a program compiling ahead in the background (the interpreter would join it).
    with contextlib.suppress(OSError):
      print(f"sweep worker (pid {os.getpid()}) interrupted: its run stopped after its checkpoint "
            "writes", file=sys.stderr, flush=True)
    os._exit(130)
  except (EOFError, BrokenPipeError):
    return  # the parent went away


def _interrupt_when_orphaned() -> None:
  """Linux: a SIGINT to this worker when the sweep's process dies (e.g. killed), as for Ctrl-C:
  its run stops after its checkpoint instead of holding a GPU for hours with no one to report to.
  Elsewhere a worker notices only when it next talks to the parent, after its run."""
  if not sys.platform.startswith("linux"):
    return
  try:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
  except (OSError, AttributeError):
    return
  parent = multiprocessing.parent_process()
  if parent is not None and os.getppid() != parent.pid:  # it died before the request took effect
    os.kill(os.getpid(), signal.SIGINT)


class _Worker:
  """The parent's handle on one worker process: its pipe and the run it is busy with."""

  def __init__(self, context, number: int, device: str, per_gpu: int, compile_cache,
               cache_workdir):
    self.number, self.device = number, device
    self.conn, child_conn = context.Pipe()
    env = worker_environment(device, per_gpu)
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the spawned interpreter inherits the environment
    try:
      self.process = context.Process(target=serve, args=(child_conn, compile_cache, cache_workdir),
                                     name=f"sweep-worker-{number}")
      self.process.start()
    finally:
      for name, value in before.items():
        if value is None:
          del os.environ[name]
        else:
          os.environ[name] = value
    child_conn.close()
    self.ready = False
    self.job = None  # (index, run) while it trains

  def receive(self):
    """The worker's next message, or None when it has exited (its pipe closed)."""
    try:
      return self.conn.recv()
    except (EOFError, OSError):
      self.process.join()
      return None

  def exit_reason(self) -> str:
    code = self.process.exitcode
    if code is not None and code < 0:
      name = signal.Signals(-code).name
      hint = " (out of host memory?)" if name == "SIGKILL" else ""
      return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def run_in_workers(todo, workers: int, per_gpu: int, started, log, compile_cache: str | None,
                   cache_workdir: str):
  """Runs `todo` ((index, PlannedRun) pairs) in `workers` processes, `per_gpu` of them on each GPU
  (`worker_devices`); yields (index, run, summary, error) as runs end, `summary` None when the run
  failed and `error` its message. `started(index, run, where)` is called as a run is handed out,
  `log(line)` for the workers' own news."""
  context = multiprocessing.get_context("spawn")
  queue = list(todo)
  devices = worker_devices(min(workers, len(queue)), per_gpu)
  pool = [_Worker(context, n, device, per_gpu, compile_cache, cache_workdir)
          for n, device in enumerate(devices, 1)]
  backend = None
  try:
    while queue or any(w.job is not None for w in pool):
      for w in pool:
        if w.ready and w.job is None and queue:
          index, run = queue[0]
          try:
            w.conn.send((index, run.workdir, run.config))
          except OSError:  # it died since it was ready: replaced below, the run waits
            continue
          w.job = queue.pop(0)
          started(index, run, f" in worker {w.number} (pid {w.process.pid})")
      ready = connection.wait([w.conn for w in pool])
      for slot, w in enumerate(pool):
        if w.conn not in ready:
          continue
        message = w.receive()
        if message is None:
          if not w.ready:
            raise UserError(f"Sweep worker {w.number} ({DEVICE_VARIABLE}={w.device}) "
                            f"{w.exit_reason()} before it was ready; its error is printed above.")
          if w.job is not None:
            index, run = w.job
            yield index, run, None, (
                f"its worker process (pid {w.process.pid}) {w.exit_reason()} during the run; "
                "rerun the sweep to resume it from its last checkpoint")
          pool[slot] = _Worker(context, w.number, w.device, per_gpu, compile_cache,
                               cache_workdir)
        elif message[0] == "ready":
          _, name, kind, count = message
          if backend is None:
            backend = name
          elif name != backend:
            raise ConfigError(
                f"Sweep worker {w.number} ({DEVICE_VARIABLE}={w.device}) runs on {name} while "
                f"an earlier worker runs on {backend}: this machine has fewer GPUs than the "
                f"workers need (--workers={workers}, --workers_per_gpu={per_gpu}), or other "
                "accelerators, which --workers cannot split (use --workers=1).")
          where = f", {DEVICE_VARIABLE}={w.device}" if name == "gpu" else ""
          log(f"worker {w.number} (pid {w.process.pid}{where}): {count} {name} device(s), {kind}")
          w.ready = True
        else:
          kind, index, payload = message
          job, w.job = w.job, None
          if kind == "done":
            yield index, job[1], payload, None
          elif kind == "failed":
            yield index, job[1], None, payload
          else:
            log(payload.rstrip())
            yield index, job[1], None, f"crashed: {payload.strip().splitlines()[-1]}"
  except BaseException as err:
    if not isinstance(err, KeyboardInterrupt):  # Ctrl-C reached the workers already
      for w in pool:  # stop the runs still going; each saves its checkpoint on the way out
        if w.job is not None and w.process.is_alive():
          os.kill(w.process.pid, signal.SIGINT)
    raise
  finally:
    _shut_down(pool)


def _shut_down(pool) -> None:
  for w in pool:
    try:
      w.conn.send(None)
    except (OSError, ValueError):
      pass  # already gone
  for w in pool:
    w.process.join(SHUTDOWN_SECONDS)
    if w.process.is_alive():
      print(f"sweep worker {w.number} (pid {w.process.pid}) did not stop within "
            f"{SHUTDOWN_SECONDS:.0f} s; terminating it", file=sys.stderr)
      w.process.terminate()
      w.process.join()
    w.conn.close()
