r"""Sweeps: every (setting, method, seed) run of a grid, resumable, tabulated like FedNML's Table II.

  python -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py --workdir=runs/sweep_rfmid_cpu
  python -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py --workdir=runs/sweep_rfmid_cpu \
      --config.methods=fedavg,fednml --config.seeds=0,1 --config.base.rounds=20
  python -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py --workdir=runs/sweep_rfmid_cpu \
      --table_only
  python -m fednml_jax.sweep --config=configs/sweeps/mured.py --workdir=runs/sweep_mured --workers=8
  python -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py --workdir=runs/sweep_rfmid_gpu \
      --workers=4 --workers_per_gpu=4

A sweep config file's `get_config()` returns `sweep_config(...)`, whose fields are:
- `base`: a full run config (`fednml_jax.config`, e.g. `cpu_setting(...)`, `paper_setting(...)`);
  override its keys with `--config.base.KEY=VALUE`;
- `methods`: `config.method` names, the table's rows in this order (`--config.methods=a,b`);
- `settings`: (label, {dotted run-config key: value}) pairs, the table's column blocks in this
  order. The extra key `labels.missing_num` = m is the paper's "Missing m": the sweep loads the
  data once, counts the classes C left after dropping rare ones, and sets
  `labels.annotation_num` = C − m;
- `seeds`: the run seeds (`--config.seeds=0,1,2`);
- `method_overrides`: (method, {dotted run-config key: value}) pairs, applied after the setting's.

Run (setting, method, seed) is `train.train_and_evaluate(config, WORKDIR/<setting>/<method>/seed<k>)`
with `resume="auto"`. Before any run starts, every method is checked against `METHODS` and every run
config is built and validated; a folder whose `config.json` differs from its run's config (in a key
that changes results) is refused rather than mixed into the table. Finished runs (`summary.json`
present) are skipped, unfinished ones resume from their last checkpoint, so rerunning the command
after Ctrl-C or a crash continues where it stopped. A run that fails with a `UserError` (e.g. a NaN
loss) is reported and the sweep goes on; the command then exits with status 1 after listing the
failed runs. Input errors exit with status 2 and one paragraph, never a traceback. The runs go one
after another in this process, or `--workers=N` at a time in worker processes, one GPU each or
`--workers_per_gpu=K` to a GPU (`fednml_jax.sweep_workers`).

Writes `WORKDIR/table.md` (the command, then rows = methods, blocks = settings, columns mAP, F1,
Recall, BAcc: mean ± std over seeds of `test_at_best_val`, the best mean per column in bold,
`(n=k)` where only k seeds finished, "—" where none did) and `WORKDIR/table.csv` (the same numbers,
see `report.metrics_csv`). `--table_only` rebuilds both from the run folders without running
anything (and without comparing their configs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import shlex
import sys
import time

import ml_collections

from fednml_jax import checkpointing, cli
from fednml_jax import config as config_lib
from fednml_jax import report
from fednml_jax.errors import ConfigError, UserError

MISSING_NUM_KEY = "labels.missing_num"  # a setting key resolved to labels.annotation_num = C − m
SETTING_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # usable as a folder name


def sweep_config(base, methods, settings, seeds, method_overrides=()) -> ml_collections.ConfigDict:
  """The ConfigDict a sweep config file returns (fields described in the module docstring)."""
  c = ml_collections.ConfigDict()
  c.base = base
  c.methods = tuple(methods)
  c.settings = tuple((label, dict(overrides)) for label, overrides in settings)
  c.seeds = tuple(seeds)
  c.method_overrides = tuple((method, dict(overrides)) for method, overrides in method_overrides)
  return c


# The paper's Table II rows: the baselines, then FedNML.
TABLE_METHODS = ("fedavg", "fedprox", "fednoro", "fedmlp", "fedlsm", "feddc", "maskedoptim",
                 "fedelc", "fednml")


def paper_sweep(source: str, num_clients: int, missing_by_noise) -> ml_collections.ConfigDict:
  """Table II's grid for a published dataset: every method of `TABLE_METHODS` under
  `config.paper_setting(source, num_clients)`, one setting per `(noise rate, m)` of
  `missing_by_noise` ("Missing m": `labels.missing_num`, resolved to annotation_num = C − m once
  the data are loaded), seeds 0, 1, 2."""
  from fednml_jax.config import paper_setting  # noqa: PLC0415
  settings = tuple((f"noise{round(100 * noise)}_missing{missing}",
                    {"labels.noise_rate": noise, "labels.missing_num": missing})
                   for noise, missing in missing_by_noise)
  return sweep_config(base=paper_setting(source, num_clients), methods=TABLE_METHODS,
                      settings=settings, seeds=(0, 1, 2))


@dataclasses.dataclass(frozen=True)
class Grid:
  """The sweep's rows, column blocks and seeds, as the table lays them out."""

  settings: tuple[str, ...]
  methods: tuple[str, ...]
  seeds: tuple[int, ...]

  def folder(self, workdir: str, setting: str, method: str, seed: int) -> str:
    return os.path.join(workdir, setting, method, f"seed{seed}")

  def cells(self):
    """(setting, method, seed) in run order: setting by setting, then method, then seed."""
    for setting in self.settings:
      for method in self.methods:
        for seed in self.seeds:
          yield setting, method, seed


@dataclasses.dataclass
class PlannedRun:
  """One run of the sweep: where it lives, its full config, and what the folder holds now."""

  setting: str
  method: str
  seed: int
  workdir: str
  config: ml_collections.ConfigDict
  status: str  # "finished" (summary.json present), "resume" (a checkpoint), "start"
  checkpoint_round: int | None = None

  @property
  def name(self) -> str:
    return f"{self.setting}/{self.method}/seed{self.seed}"


@dataclasses.dataclass
class SweepOutcome:
  """What a sweep did: run counts, the failed runs with their messages, and the markdown table."""

  total: int
  skipped: int
  ran: int
  failed: list[tuple[str, str]]
  table: str


def read_grid(sweep) -> Grid:
  """The sweep's settings, methods and seeds, checked for shape (not against METHODS)."""
  methods = tuple(m.strip() for item in sweep.methods for m in str(item).split(",") if m.strip())
  labels = tuple(label for label, _ in sweep.settings)
  seeds = tuple(sweep.seeds)
  problems = []
  if not methods:
    problems.append("config.methods is empty")
  if not labels:
    problems.append("config.settings is empty")
  if not seeds:
    problems.append("config.seeds is empty")
  bad_labels = [label for label in labels if not SETTING_LABEL.match(str(label))]
  if bad_labels:
    problems.append(f"setting labels {bad_labels} are not usable as folder names (letters, digits, "
                    "'_', '.', '+', '-')")
  if any(not isinstance(seed, int) or isinstance(seed, bool) for seed in seeds):
    problems.append(f"config.seeds = {seeds} must be integers")
  for what, values in (("methods", methods), ("setting labels", labels), ("seeds", seeds)):
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
      problems.append(f"{what} {repeated} appear more than once")
  if problems:
    raise ConfigError("The sweep config is malformed: " + "; ".join(problems) + ".")
  return Grid(labels, methods, seeds)


def check_methods(methods) -> None:
  """Raises a ConfigError naming every method of the sweep that is not registered."""
  from fednml_jax.methods import METHODS  # noqa: PLC0415
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ConfigError(f"Unknown method(s) in the sweep: {', '.join(unknown)}. Valid methods are "
                      f"{', '.join(sorted(METHODS))}. Remove the others from config.methods (e.g. "
                      "--config.methods=fedavg,fednml); nothing was run.")


def _set_dotted(config, key: str, value, where: str) -> None:
  """config[key] = value for a dotted key of the run-config schema; ConfigError otherwise."""
  node = config
  *parents, leaf = key.split(".")
  try:
    for parent in parents:
      node = node[parent]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise KeyError(key)
    node[leaf] = value
  except (KeyError, AttributeError):
    close = difflib.get_close_matches(key, config_lib.flatten(config), n=1)
    raise ConfigError(f"{where} overrides the unknown run-config key {key!r}"
                      + (f" (did you mean {close[0]!r}?)" if close else "")
                      + ". Valid keys are listed in fednml_jax/config.py.") from None
  except TypeError as err:
    raise ConfigError(f"{where} sets {key} = {value!r}, a value of the wrong type ({err}).") from None


def _resolve_missing_num(config, missing_num: int, where: str, num_classes_cache: dict) -> None:
  """Sets labels.annotation_num = C − missing_num, C = the classes of config.data after the
  rare-class filter (the data are loaded once per distinct data config)."""
  from fednml_jax.data import load_dataset  # noqa: PLC0415
  data_key = config_lib.to_json(config.data)
  if data_key not in num_classes_cache:
    num_classes_cache[data_key] = load_dataset(config.data).num_classes
  num_classes = num_classes_cache[data_key]
  if not isinstance(missing_num, int) or not 0 <= missing_num < num_classes:
    raise ConfigError(
        f"{where} sets {MISSING_NUM_KEY} = {missing_num!r}, but the data ({config.data.source}, "
        f"{config.data.path or 'built in'}) have {num_classes} classes after dropping those with "
        f"fewer than {config.data.min_positives} training positives, so it must be an integer in "
        f"0..{num_classes - 1}.")
  config.labels.annotation_num = num_classes - missing_num


def run_config(sweep, setting: str, method: str, seed: int, num_classes_cache: dict):
  """The full run config of one (setting, method, seed), validated."""
  where = f"Sweep setting {setting!r}"
  config = sweep.base.copy_and_resolve_references()
  overrides = dict(dict(sweep.settings)[setting])
  missing_num = overrides.pop(MISSING_NUM_KEY, None)
  for key, value in overrides.items():
    _set_dotted(config, key, value, where)
  for key, value in dict(dict(sweep.method_overrides).get(method, {})).items():
    _set_dotted(config, key, value, f"The sweep's method_overrides for {method!r}")
  config.method, config.seed, config.compare, config.resume = method, seed, "", "auto"
  if missing_num is not None:
    if "labels.annotation_num" in overrides:
      raise ConfigError(f"{where} sets both labels.annotation_num and {MISSING_NUM_KEY}; keep one.")
    _resolve_missing_num(config, missing_num, where, num_classes_cache)
  try:
    config_lib.validate(config)
  except ConfigError as err:
    raise ConfigError(f"In the sweep run {setting}/{method}/seed{seed}: {err}") from None
  return config


def _folder_status(workdir: str, config) -> tuple[str, int | None]:
  """What a run folder holds: ("finished", None), ("resume", its latest checkpoint round),
  ("start", None), or ("conflict", the differing keys) when its config.json is another config's."""
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      saved = json.load(f)
    differing = checkpointing.config_differences(saved, config.to_dict())
    if differing:
      return "conflict", ", ".join(differing[:6]) + (" …" if len(differing) > 6 else "")
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return "finished", None
  rounds = checkpointing._saved_rounds(workdir)  # noqa: SLF001
  return ("resume", rounds[-1]) if rounds else ("start", None)


def plan(sweep, workdir: str) -> tuple[Grid, list[PlannedRun]]:
  """Checks the whole sweep before anything runs: the grid, the methods, every run config, and that
  no run folder holds a run of another config. Returns the grid and the runs in order."""
  grid = read_grid(sweep)
  check_methods(grid.methods)
  # Overrides of methods this invocation leaves out (e.g. narrowed with --config.methods) are
  # unused; a name that is no method at all is a mistake.
  check_methods(tuple(dict(sweep.method_overrides)))
  num_classes_cache: dict = {}
  runs, conflicts = [], []
  for setting, method, seed in grid.cells():
    config = run_config(sweep, setting, method, seed, num_classes_cache)
    folder = grid.folder(workdir, setting, method, seed)
    status, detail = _folder_status(folder, config)
    if status == "conflict":
      conflicts.append(f"{folder} ({detail})")
      continue
    runs.append(PlannedRun(setting, method, seed, folder, config, status, detail))
  if conflicts:
    raise ConfigError(
        f"{len(conflicts)} run folder(s) of {workdir} hold a run with a different config, so the "
        f"sweep would mix two experiments in one table: {'; '.join(conflicts[:5])}"
        + (" …" if len(conflicts) > 5 else "") + ". Pick a new --workdir for the changed sweep, or "
        "delete those run folders to rerun them.")
  return grid, runs


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _progress(ended: int, total: int, start: float) -> str:
  """'sweep elapsed H:MM:SS, k of n runs ended, about H:MM:SS left' (the rate so far)."""
  elapsed = time.time() - start
  text = f"sweep elapsed {_hms(elapsed)}, {ended} of {total} runs ended"
  if 0 < ended < total:
    text += f", about {_hms(elapsed * (total - ended) / ended)} left"
  return text


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def write_tables(sweep, workdir: str, command: str, grid: Grid | None = None) -> str:
  """Writes WORKDIR/table.md and WORKDIR/table.csv from the finished runs of the sweep's grid;
  returns the markdown."""
  grid = grid or read_grid(sweep)
  runs = []
  for setting, method, seed in grid.cells():
    run = report.load_run(grid.folder(workdir, setting, method, seed))
    if run is not None:
      runs.append(dict(run, setting=setting, method=method))
  blocks = [(setting, setting) for setting in grid.settings]
  stats = report.group_metrics(runs, lambda r: r["method"], lambda r: r["setting"])
  table = report.metrics_table(list(grid.methods), blocks, stats, seeds=len(grid.seeds),
                               bold_best=True)
  total = len(grid.settings) * len(grid.methods) * len(grid.seeds)
  settings_legend = "\n".join(
      f"- `{label}`: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
      for label, overrides in sweep.settings)
  text = (f"Made by: `{command}`\n\n"
          f"Test metrics at the best-validation round (`test_at_best_val`), mean ± std (population) "
          f"over seeds {', '.join(map(str, grid.seeds))}; the best mean of each column in bold; "
          f"(n=k): only k of the {len(grid.seeds)} seeds have finished; {report.MISSING}: no "
          f"finished run. {len(runs)} of {total} runs finished.\n\n"
          f"{table}\n\n{report.class_prior_note(runs, lambda r: r['setting'], blocks)}\n\n"
          f"Settings:\n\n{settings_legend}\n")
  os.makedirs(workdir, exist_ok=True)
  for name, content in (("table.md", text), ("table.csv",
                                             report.metrics_csv(list(grid.methods), blocks, stats))):
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(content)
    os.replace(path + ".tmp", path)
  return text


def _run_here(todo, started):
  """Runs `todo` ((index, PlannedRun) pairs) one after another in this process; yields (index,
  run, summary, error) like `sweep_workers.run_in_workers`. Errors other than `UserError` stop
  the sweep."""
  from fednml_jax import train  # noqa: PLC0415  (imports JAX)
  for index, run in todo:
    started(index, run, "")
    try:
      summary = train.train_and_evaluate(run.config, run.workdir)
    except UserError as err:
      yield index, run, None, str(err)
      continue
    yield index, run, summary, None


def run_sweep(sweep, workdir: str, command: str, workers: int = 1, workers_per_gpu: int = 1,
              compile_cache: str | None = None) -> SweepOutcome:
  """Runs every unfinished run of the sweep, then writes the tables. `workers` = 1: one after
  another in this process; more: that many at a time in worker processes, `workers_per_gpu` of
  them on each GPU (`sweep_workers`). `compile_cache`: the runs' persistent compilation cache
  (`cli.enable_compile_cache`; None leaves JAX's settings as they are). Progress goes to stderr.
  Ctrl-C stops the sweep (finished runs stay on disk, the current ones resume from their last
  checkpoints next time) after writing the tables of what finished."""
  from fednml_jax import sweep_workers, train  # noqa: PLC0415  (imports JAX; starts no backend)
  grid, runs = plan(sweep, workdir)
  train.prepare_workdir(workdir)
  if compile_cache is not None:
    cli.enable_compile_cache(compile_cache, workdir)
  counts = {s: sum(r.status == s for r in runs) for s in ("finished", "resume", "start")}
  _log(f"sweep: {len(runs)} runs ({len(grid.settings)} settings × {len(grid.methods)} methods × "
       f"{len(grid.seeds)} seeds) in {workdir}: {counts['finished']} finished earlier, "
       f"{counts['resume']} to resume, {counts['start']} to start"
       + (f"; {workers} worker processes" if workers > 1 else ""))
  start = time.time()
  tag = lambda index, run: f"[{index}/{len(runs)}] {run.name}"  # noqa: E731
  todo = []
  for index, run in enumerate(runs, 1):
    if run.status == "finished":
      _log(f"{tag(index, run)}: finished earlier, skipped")
    else:
      todo.append((index, run))

  def started(index, run, where):
    what = (f"resuming from the checkpoint after round {run.checkpoint_round}"
            if run.status == "resume" else "starting")
    _log(f"{tag(index, run)}: {what}{where}")

  if workers > 1 and todo:
    results = sweep_workers.run_in_workers(todo, workers, workers_per_gpu, started, _log,
                                           compile_cache, workdir)
  else:
    results = _run_here(todo, started)
  failed, ran = [], 0
  try:
    with contextlib.closing(results):
      for index, run, summary, error in results:
        if error is not None:
          failed.append((run.name, error))
          _log(f"{tag(index, run)}: FAILED: {error}")
          continue
        ran += 1
        best = summary["test_at_best_val"] or {}
        _log(f"{tag(index, run)}: done in {summary['seconds']:.0f} s, test mAP "
             f"{best.get('mAP', float('nan')):.3f} at the best validation round "
             f"({summary['best_val_round']}); {_progress(ran + len(failed), len(todo), start)}")
  except KeyboardInterrupt:
    _log(f"\nsweep interrupted after {_hms(time.time() - start)}: finished runs are on disk and "
         "the interrupted ones resume from their last checkpoints; rerun the same command to "
         "continue.")
    write_tables(sweep, workdir, command, grid)
    raise
  table = write_tables(sweep, workdir, command, grid)
  _log(f"sweep done in {_hms(time.time() - start)}: {ran} ran, {counts['finished']} skipped, "
       f"{len(failed)} failed; tables in {os.path.join(workdir, 'table.md')} and table.csv")
  return SweepOutcome(len(runs), counts["finished"], ran, failed, table)


def _main_cli():
  """`python -m fednml_jax.sweep`; the flags are defined here, not at import, because sweep config
  files import this module (`sweep_config`) while it also runs as __main__."""
  from absl import app, flags, logging  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  sweep_flag = config_flags.DEFINE_config_file("config", None, "A sweep config file in "
                                               "configs/sweeps/.", lock_config=True)
  workdir_flag = flags.DEFINE_string("workdir", None, "Folder of the sweep: one sub-folder per "
                                     "run (<setting>/<method>/seed<k>), table.md, table.csv.")
  table_only_flag = flags.DEFINE_bool("table_only", False, "Only rebuild table.md and table.csv "
                                      "from the finished runs on disk.")
  compile_cache_flag = cli.define_compile_cache_flag()
  workers_flag = flags.DEFINE_integer(
      "workers", 1, "How many runs go at a time: 1 runs them one after another in this process; "
      "N > 1 starts N worker processes, worker i on the i-th GPU of CUDA_VISIBLE_DEVICES (GPU "
      "i - 1 when unset), and hands each the next unfinished run as it frees up.", lower_bound=1)
  per_gpu_flag = flags.DEFINE_integer(
      "workers_per_gpu", 1, "With --workers=N: how many workers share one GPU (each then takes "
      "0.9/K of its memory), for models too small to keep a GPU busy.", lower_bound=1)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      # Orbax logs every checkpoint save at INFO, which buries the sweep's progress lines.
      logging.set_verbosity(logging.WARNING)
    command = "python -m fednml_jax.sweep " + shlex.join(sys.argv[1:])
    try:
      if table_only_flag.value:
        print(write_tables(sweep_flag.value, workdir_flag.value, command))
        return
      outcome = run_sweep(sweep_flag.value, workdir_flag.value, command,
                          workers=workers_flag.value, workers_per_gpu=per_gpu_flag.value,
                          compile_cache=compile_cache_flag.value)
    except UserError as err:
      print(f"\nerror: {err}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      # Everything is on disk (the interrupted runs waited for their checkpoint writes, the
      # tables were written); skipping the interpreter's teardown avoids a crash in JAX's threads
      # after an interrupt.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)
    print(outcome.table)
    if outcome.failed:
      print(f"{len(outcome.failed)} run(s) failed (rerun the command after fixing them; finished "
            "runs are skipped):", file=sys.stderr)
      for name, message in outcome.failed:
        print(f"- {name}: {message}", file=sys.stderr)
      sys.exit(1)

  app.run(main, flags_parser=cli.flags_parser(
      "python -m fednml_jax.sweep --config=configs/sweeps/NAME.py --workdir=DIR [--table_only] "
      "[--compile_cache=auto|none|DIR] [--workers=N [--workers_per_gpu=K]] "
      "[--config.KEY=VALUE ...]",
      "the sweep configs are in configs/sweeps/"))


if __name__ == "__main__":
  _main_cli()
