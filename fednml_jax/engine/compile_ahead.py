"""Jitted programs that can be compiled before their first call, in a background thread.

A run compiles one round program per method phase, and each used to compile at its first call,
inside the training loop, while the device waited: on one H100 the paper configuration's round
program took 12.6 s to compile (23 s in bfloat16) against about 1 s per round after that
(docs/performance.md), and FedNML compiles two (warm-up and refinement phase). XLA's compiler
releases Python's GIL, so a worker thread can compile the next phase's program while the rounds
before it run: `train_and_evaluate` starts that after the run's first round (so that the first
program compiles alone, and a GPU's autotuning results for the convolutions both programs share
are already cached), through `Experiment.compile_ahead`.

`AheadOfTime(fn)` is `jax.jit(fn)` plus `compile_in(executor, *args)`, which lowers and compiles
the function for the signature of `args` (pytree structure, shapes, dtypes, weak types and
shardings, and the caller's thread-local JAX settings, e.g. a `jax.default_matmul_precision`
block, which the worker thread must share or it compiles nothing) in `executor`. A call with that
signature runs the executable compiled ahead, waiting for it if it is still compiling; any other
call goes through `jax.jit` as usual. It is the same compiled program either way, so results do
not depend on whether it was compiled ahead. A run that stops (an error, Ctrl-C) while a program compiles ahead exits once that compile
has finished (Python joins the worker thread at exit).

Measured on the project's 2-core CPU (docs/performance.md): 20-round FedNML runs of the CPU preset,
alternating without and with it, 137.7, 128.3, 136.3, 115.9 s (the refinement phase's first round
37–39 s without, 7–11 s with; the warm-up rounds it overlaps slow from 3.1 to 4.4–4.5 s). Compiling
from the start instead, beside the first round's program, saved nothing there (both compiles
share the two cores). On an accelerator the host's cores idle while the device trains.
"""

from __future__ import annotations

import threading
from concurrent import futures

import jax

try:  # JAX's thread-local settings (`jax.default_matmul_precision(...)` blocks and the like)
  from jax._src.config import trace_context
except ImportError:  # a JAX that moved it: nothing is compiled ahead (see `compile_in`)
  trace_context = None


def signature(args) -> tuple:
  """What an executable compiled for `args` requires of the arguments it is called with, and of
  the thread-local JAX settings it is called under."""
  leaves, treedef = jax.tree.flatten(args)
  return (treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves),
          trace_context() if trace_context else None)


class AheadOfTime:
  """`jax.jit(fn, **jit_kwargs)` whose executables can be compiled ahead (`compile_in`)."""

  def __init__(self, fn, **jit_kwargs):
    self.jitted = jax.jit(fn, **jit_kwargs)
    self._executables: dict[tuple, futures.Future] = {}
    self._lock = threading.Lock()

  def compile_in(self, executor: futures.Executor, *args) -> futures.Future:
    """Starts compiling for the signature of `args` (real arrays, as the later call will pass)
    in `executor`; returns the future of the compiled executable, or of None where the worker
    thread's JAX settings differ from the caller's (thread-local settings do not pass to other
    threads): such a call then compiles as usual."""
    key = signature(args)
    caller_settings = key[2]

    def compile_():
      if trace_context is None or trace_context() != caller_settings:
        return None
      return self.jitted.lower(*args).compile()

    with self._lock:
      if key not in self._executables:
        self._executables[key] = executor.submit(compile_)
      return self._executables[key]

  def __call__(self, *args):
    if self._executables:
      ahead = self._executables.get(signature(args))
      if ahead is not None and not ahead.cancelled():
        compiled = ahead.result()
        if compiled is not None:
          return compiled(*args)
    return self.jitted(*args)
