r"""Where one engine round's time goes, operation by operation (issue #6).

  python benchmarks/profile_round.py --preset=cpu [--method=fedavg] [--round=1] [--top=30]
      [size flags of round_time.py]

Runs the round `--round` of the JAX engine (`round_time.JaxRunner`) twice untimed (compilation),
then once under `jax.profiler`, and prints the XLA operations (fusions, convolutions, gathers, ...)
that took the most thread time, with their output shape and the JAX operation they came from
(`op_name` metadata of the optimised HLO, e.g. `transpose(jvp(SmallCNN))/conv3/conv_general_dilated`
is conv3's backward pass), summed over all the round's executions of that operation. Times are
thread time (summed over XLA's worker threads), so they add up to more than the round's wall time
when operations run in parallel. The optimised HLO is dumped to a temporary folder to map the
profile's operation names to shapes and sources (`--keep_dump=DIR` keeps it).

On XLA:CPU the profiler records one event per executed HLO operation (thunk) on XLA's worker
threads. On a GPU the events are the kernels on the device's stream threads (named `... (Kernel)`,
as JAX's own profiler tests find them), each labelled with the HLO operation that launched it
(`hlo_op`); times are then kernel (device) time, summed per operation. Not yet run on a GPU: if no
events are recognised there, the script lists the trace's process and thread names instead, so
that the parsing can be fixed from its output.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args(argv=None):
  import round_time  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=round_time.PRESETS, default="cpu")
  parser.add_argument("--method", choices=round_time.METHODS, default="fedavg")
  parser.add_argument("--round", type=int, default=1, dest="rnd",
                      help="which round to profile (FedNML: its warm-up rounds are plain rounds; "
                           "the round fednml.warmup_rounds refines the labels first)")
  parser.add_argument("--top", type=int, default=30, help="operations to list")
  parser.add_argument("--keep_dump", help="keep the HLO dump and the trace in this folder")
  round_time.add_preset_size_args(parser)
  return parser.parse_args(argv)


def hlo_instructions(dump_dir: str) -> dict:
  """{instruction name: (shape, op_name)} over the dumped optimised modules, largest first (so a
  name that several modules use maps to the round program's instruction)."""
  files = glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
  table = {}
  for path in sorted(files, key=os.path.getsize, reverse=True):
    with open(path) as f:
      for line in f:
        match = re.match(r"\s+(?:ROOT )?%(\S+) = (\S+?) ", line)
        if match and match.group(1) not in table:
          op_name = re.search(r'op_name="([^"]*)"', line)
          table[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  return table


def operation_times(trace_dir: str, backend: str) -> tuple[dict, dict]:
  """({operation name: total µs}, {operation name: count}) from the trace in `trace_dir`."""
  paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  if not paths:
    raise SystemExit(f"no perfetto trace under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    return trace_operation_times(json.load(f)["traceEvents"], backend)


def trace_operation_times(events: list, backend: str) -> tuple[dict, dict]:
  """On CPU the XLA worker threads' events; on a device (a process named `/device:...`) its
  kernels, on the stream threads named `... (Kernel)` as the trace viewer names them (not its
  derived "XLA Ops" / "XLA Modules" lines, which would count the same time again), grouped by
  the HLO operation that launched them (`args.hlo_op`). Without kernel threads, every event of
  the device's processes."""
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in processes.items() if "/device:" in name}
  kernel_threads = {key for key, name in threads.items()
                    if key[0] in device_pids and "Kernel" in name}
  total, count = collections.defaultdict(float), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X":
      continue
    thread = (e.get("pid"), e.get("tid"))
    if backend == "cpu":
      if (not threads.get(thread, "").startswith("tf_XLA")
          or name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "end: "))):
        continue  # Python frames, executor bookkeeping and waits: not operations
    else:
      if thread[0] not in device_pids or (kernel_threads and thread not in kernel_threads):
        continue  # host threads, and the device's derived lines
      name = (e.get("args") or {}).get("hlo_op") or name
    total[name] += e.get("dur", 0.0)
    count[name] += 1
  if not total:
    raise SystemExit("no operation events recognised in the trace; its processes: "
                     f"{sorted(set(processes.values()))}; threads: {sorted(set(threads.values()))}")
  return total, count


def main(argv=None):
  args = parse_args(argv)
  work = args.keep_dump or tempfile.mkdtemp(prefix="fednml_profile_")
  dump_dir, trace_dir = os.path.join(work, "hlo"), os.path.join(work, "trace")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                             " --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE").strip()
  import jax  # pylint: disable=import-outside-toplevel
  import round_time  # pylint: disable=import-outside-toplevel
  backend = jax.default_backend()
  jax.config.update("jax_enable_compilation_cache", False)  # compile here, so the HLO is dumped
  with tempfile.TemporaryDirectory(prefix="fednml_bench_") as tmpdir:
    config, data = round_time.preset_config(args, tmpdir)
    config.method = args.method
    runner = round_time.JaxRunner(config)
    for _ in range(2):
      runner.round(args.rnd)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    parts = runner.round(args.rnd)
    jax.profiler.stop_trace()
  instructions = hlo_instructions(dump_dir)
  total, count = operation_times(trace_dir, backend)
  by_source = collections.defaultdict(float)
  executions = collections.Counter()
  for name, micros in total.items():
    shape, op_name = instructions.get(name, ("?", "?"))
    kind = re.sub(r"\.\d+$", "", name)
    op_name = re.sub(r"^jit\([^)]*\)/(closed_call/)?", "", op_name)
    key = (kind, shape, op_name)
    by_source[key] += micros
    executions[key] += count[name]
  thread_seconds = sum(total.values()) / 1e6
  unit = "thread" if backend == "cpu" else "device"
  print(f"{args.method} round {args.rnd} on {data}: wall " + ", ".join(
      f"{k} {v:.3f} s" for k, v in parts.items() if v > 1e-4)
        + f"; XLA operations {thread_seconds:.3f} {unit}-s")
  print(f"{unit + '-ms':>10s} {'share':>6s} {'runs':>6s}  {'operation':26s} {'shape':34s} source")
  for (kind, shape, op_name), micros in sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"{micros / 1e3:10.1f} {micros / 1e4 / thread_seconds:5.1f}% "
          f"{executions[(kind, shape, op_name)]:6d}  {kind[:26]:26s} {shape[:34]:34s} {op_name}")
  if not args.keep_dump:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
