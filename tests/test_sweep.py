"""Sweeps (`python -m fednml_jax.sweep`): the Table II layout, skipping finished runs, resuming an
interrupted one, failed runs, clear errors, and the sweep configs in configs/sweeps/."""

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from fednml_jax import sweep, train
from fednml_jax.errors import ConfigError, UserError

from conftest import REPO, tiny_config

TINY_SETTINGS = (("noise20_ann7", {"labels.noise_rate": 0.2, "labels.annotation_num": 7}),
                 ("noise40_ann5", {"labels.noise_rate": 0.4, "labels.annotation_num": 5}))


def tiny_sweep(**fields):
  """2 settings × fedavg, fedprox × seed 0 on the tiny embedded data, 2 rounds, a checkpoint after
  every round (so an interruption in round 1 resumes from round 1)."""
  base = tiny_config(**{"checkpoint.every": 1})
  args = dict(base=base, methods=("fedavg", "fedprox"), settings=TINY_SETTINGS, seeds=(0,))
  args.update(fields)
  return sweep.sweep_config(**args)


def run_cli(args, timeout=120):
  env = dict(os.environ, FEDNML_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fednml_jax.sweep", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def write_sweep_file(path, methods):
  """A sweep config file equal to `tiny_sweep(methods=methods)`, for the command-line tests."""
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "from test_sweep import tiny_sweep\n\n\n"
      f"def get_config():\n  return tiny_sweep(methods={tuple(methods)!r})\n")
  return path


def table_rows(markdown):
  """{method: [cells]} of the method rows of the markdown table (after the header and the row of
  metric names)."""
  lines = [line for line in markdown.splitlines() if line.startswith("| ")]
  rows = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return rows


# Layout on hand-made run folders ----------------------------------------------------------------

def _fake_run(root, setting, method, seed, m_ap, f1):
  folder = root / setting / method / f"seed{seed}"
  folder.mkdir(parents=True)
  block = {"mAP": m_ap, "F1": f1, "Recall": 0.2, "BAcc": 0.5, "Precision": 0.1, "AUROC": 0.6}
  summary = {"method": method, "dataset": "toy", "seed": seed, "noise_rate": 0.2,
             "annotation_num": 7, "test_at_best_val": block, "test_final": block,
             "test_class_prior": dict(block, mAP=0.15)}
  (folder / "summary.json").write_text(json.dumps(summary))


def test_table_layout_mean_std_bold_counts_and_missing_cells(tmp_path):
  # fedavg: 2 of 2 seeds in s1, none in s2; fednml: 1 of 2 seeds in s1, 2 in s2.
  _fake_run(tmp_path, "noise20_ann7", "fedavg", 0, 0.30, 0.10)
  _fake_run(tmp_path, "noise20_ann7", "fedavg", 1, 0.40, 0.20)
  _fake_run(tmp_path, "noise20_ann7", "fednml", 0, 0.20, 0.50)
  _fake_run(tmp_path, "noise40_ann5", "fednml", 0, 0.10, 0.30)
  _fake_run(tmp_path, "noise40_ann5", "fednml", 1, 0.20, 0.30)
  config = tiny_sweep(methods=("fednml", "fedavg"), seeds=(0, 1))
  text = sweep.write_tables(config, str(tmp_path), "python -m fednml_jax.sweep --made=by-hand")
  assert text == (tmp_path / "table.md").read_text()
  assert text.startswith("Made by: `python -m fednml_jax.sweep --made=by-hand`")
  header = next(line for line in text.splitlines() if line.startswith("| method"))
  assert [c.strip() for c in header.strip("|").split("|")] == [
      "method", "noise20_ann7", "", "", "", "noise40_ann5", "", "", ""]
  assert "| | mAP | F1 | Recall | BAcc | mAP | F1 | Recall | BAcc |" in text
  rows = table_rows(text)
  assert list(rows) == ["fednml", "fedavg"]  # the sweep's order
  # fedavg in s1: mean 0.35, population std 0.05 of (0.30, 0.40): best mAP, bold; all seeds: no n.
  assert rows["fedavg"][:4] == ["**0.350** ± 0.050", "0.150 ± 0.050", "**0.200** ± 0.000",
                                "**0.500** ± 0.000"]
  assert rows["fedavg"][4:] == ["—"] * 4
  # fednml in s1: 1 of 2 seeds; its F1 0.5 is the column's best; Recall, BAcc tie with fedavg.
  assert rows["fednml"][:4] == ["0.200 (n=1)", "**0.500** (n=1)", "**0.200** (n=1)",
                                "**0.500** (n=1)"]
  assert rows["fednml"][4] == "**0.150** ± 0.050"  # the only method in s2 is the best
  assert "5 of 8 runs finished" in text
  table = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
  assert [row["method"] for row in table] == ["fednml", "fedavg"]
  assert float(table[1]["noise20_ann7/mAP/mean"]) == pytest.approx(0.35)
  assert float(table[1]["noise20_ann7/mAP/std"]) == pytest.approx(0.05)
  assert table[1]["noise20_ann7/mAP/n"] == "2"
  assert table[1]["noise40_ann5/F1/mean"] == "" and table[1]["noise40_ann5/F1/n"] == "0"
  assert table[0]["noise20_ann7/F1/n"] == "1"


# End to end on tiny embedded data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """A tiny sweep interrupted (Ctrl-C) in round 1 of its third run, then rerun to the end."""
  workdir = tmp_path_factory.mktemp("sweep")
  interrupted = workdir / "noise40_ann5" / "fedavg" / "seed0"
  real_run_round = train.Experiment.run_round

  def interrupt(self, rnd, *args):
    if rnd == 1 and self.config.labels.noise_rate == 0.4 and self.config.method == "fedavg":
      raise KeyboardInterrupt
    return real_run_round(self, rnd, *args)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train.Experiment, "run_round", interrupt)
    with pytest.raises(KeyboardInterrupt):
      sweep.run_sweep(tiny_sweep(), str(workdir), "first")
  assert (workdir / "noise20_ann7" / "fedprox" / "seed0" / "summary.json").exists()
  assert not (interrupted / "summary.json").exists()
  assert (interrupted / "checkpoints" / "1").is_dir()
  assert "2 of 4 runs finished" in (workdir / "table.md").read_text()  # tables of what finished
  outcome = sweep.run_sweep(tiny_sweep(), str(workdir), "python -m fednml_jax.sweep --test")
  return workdir, outcome


def test_sweep_runs_the_grid_and_writes_the_tables(finished_sweep):
  workdir, outcome = finished_sweep
  assert (outcome.total, outcome.skipped, outcome.ran, outcome.failed) == (4, 2, 2, [])
  for setting, overrides in TINY_SETTINGS:
    for method in ("fedavg", "fedprox"):
      folder = workdir / setting / method / "seed0"
      summary = json.loads((folder / "summary.json").read_text())
      config = json.loads((folder / "config.json").read_text())
      assert (summary["method"], summary["seed"], summary["rounds"]) == (method, 0, 2)
      assert config["labels"]["annotation_num"] == overrides["labels.annotation_num"]
  text = (workdir / "table.md").read_text()
  assert text.startswith("Made by: `python -m fednml_jax.sweep --test`")
  assert outcome.table == text
  rows = table_rows(text)
  assert list(rows) == ["fedavg", "fedprox"]
  cells = rows["fedavg"] + rows["fedprox"]
  # One seed: each cell is that run's value, with neither a spread nor an (n=k) mark.
  assert len(cells) == 16 and all(" ± " not in c and "(n=" not in c for c in cells)
  assert sum("**" in c for c in cells) >= 8  # at least one best per column
  summary = json.loads((workdir / "noise20_ann7/fedprox/seed0/summary.json").read_text())
  table = {row["method"]: row for row in csv.DictReader(open(workdir / "table.csv"))}
  assert float(table["fedprox"]["noise20_ann7/BAcc/mean"]) == pytest.approx(
      summary["test_at_best_val"]["BAcc"])


def test_interrupted_run_resumed_from_its_checkpoint(finished_sweep):
  workdir, _ = finished_sweep
  resumed = json.loads((workdir / "noise40_ann5/fedavg/seed0/summary.json").read_text())
  assert resumed["resumed_from_round"] == 1
  started = json.loads((workdir / "noise40_ann5/fedprox/seed0/summary.json").read_text())
  assert started["resumed_from_round"] is None


def test_second_invocation_skips_finished_runs(finished_sweep, monkeypatch, capsys):
  workdir, _ = finished_sweep
  summaries = sorted(workdir.rglob("summary.json"))
  before = {path: path.stat().st_mtime_ns for path in summaries}

  def no_training(config, workdir):
    raise AssertionError(f"retrained {workdir}")

  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  outcome = sweep.run_sweep(tiny_sweep(), str(workdir), "again")
  assert (outcome.skipped, outcome.ran, outcome.failed) == (4, 0, [])
  assert {path: path.stat().st_mtime_ns for path in summaries} == before
  assert "[4/4] noise40_ann5/fedprox/seed0: finished earlier, skipped" in capsys.readouterr().err


def test_changed_config_is_refused_before_running(finished_sweep, monkeypatch):
  workdir, _ = finished_sweep
  monkeypatch.setattr(train, "train_and_evaluate", None)  # nothing may run
  changed = tiny_sweep(base=tiny_config(**{"checkpoint.every": 1, "optim.lr": 0.1}))
  with pytest.raises(ConfigError, match=r"4 run folder\(s\).*optim\.lr.*new --workdir"):
    sweep.run_sweep(changed, str(workdir), "changed")


def test_table_only_on_the_command_line(finished_sweep, tmp_path):
  workdir, _ = finished_sweep
  (workdir / "table.md").unlink()
  config_file = write_sweep_file(tmp_path / "tiny_sweep.py", ("fedprox", "fedavg"))
  done = run_cli([f"--config={config_file}", f"--workdir={workdir}", "--table_only",
                  "--config.seeds=0,1"])
  assert done.returncode == 0, done.stderr[-3000:]
  text = (workdir / "table.md").read_text()
  assert text.startswith(f"Made by: `python -m fednml_jax.sweep --config={config_file} "
                         f"--workdir={workdir} --table_only --config.seeds=0,1`")
  assert list(table_rows(text)) == ["fedprox", "fedavg"]
  assert "(n=1)" in text  # 1 of the 2 seeds asked for
  assert "| fedprox |" in done.stdout
  assert not (workdir / "noise20_ann7" / "fedavg" / "seed1").exists()  # nothing ran


def test_failed_run_is_reported_and_the_sweep_continues(tmp_path, monkeypatch, capsys):
  ran = []

  def fake_train(config, workdir):
    if config.method == "fedprox" and config.labels.noise_rate == 0.2:
      raise UserError("The training loss became nan in round 1 on client 0.")
    ran.append(workdir)
    block = {"mAP": 0.3, "F1": 0.2, "Recall": 0.2, "BAcc": 0.5}
    summary = {"method": config.method, "seconds": 1.0, "best_val_round": 1,
               "test_at_best_val": block, "test_class_prior": block}
    pathlib.Path(workdir).mkdir(parents=True)
    pathlib.Path(workdir, "summary.json").write_text(json.dumps(summary))
    return summary

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  outcome = sweep.run_sweep(tiny_sweep(), str(tmp_path), "failing")
  assert len(ran) == 3
  assert outcome.failed == [("noise20_ann7/fedprox/seed0",
                             "The training loss became nan in round 1 on client 0.")]
  assert "[2/4] noise20_ann7/fedprox/seed0: FAILED" in capsys.readouterr().err
  assert table_rows(outcome.table)["fedprox"][:4] == ["—"] * 4


def test_workers_run_the_grid_as_one_process_does_and_a_killed_worker_fails_only_its_run(
    finished_sweep, tmp_path, monkeypatch):
  """`workers=2` runs the same grid in two spawned processes: the same metrics as the sweep run in
  this process (`finished_sweep`), bit for bit. The worker handed the first run is killed at once
  (SIGKILL, as the kernel's out-of-memory killer does): that run fails, a fresh worker takes its
  place, the other runs finish, and the next invocation runs the failed one. A third setting's
  runs fail in their worker with a `UserError` (more clients than images): reported, the sweep
  goes on."""
  lines = []

  def log(line):
    lines.append(line)
    print(line, file=sys.stderr)
    if "starting in worker" in line and not any("KILLED" in x for x in lines):
      pid = int(re.search(r"\(pid (\d+)\)", line).group(1))
      os.kill(pid, signal.SIGKILL)
      lines.append(f"KILLED {pid}")

  monkeypatch.setattr(sweep, "_log", log)
  workdir = tmp_path / "workers"
  grid = tiny_sweep(settings=TINY_SETTINGS + (("too_many_clients", {"fl.num_clients": 1000}),))
  outcome = sweep.run_sweep(grid, str(workdir), "workers", workers=2)
  assert (outcome.ran, len(outcome.failed)) == (3, 3)
  failed = dict(outcome.failed)
  assert re.fullmatch(r"its worker process \(pid \d+\) was killed by SIGKILL \(out of host "
                      r"memory\?\) during the run; rerun the sweep to resume it from its last "
                      r"checkpoint", failed.pop("noise20_ann7/fedavg/seed0"))
  assert failed == {f"too_many_clients/{m}/seed0": "config.fl.num_clients = 1000 exceeds the 160 "
                    "training samples of digit_mosaics; every client needs at least one."
                    for m in ("fedavg", "fedprox")}
  assert any(re.search(r": done in \d+ s, .*; sweep elapsed \d:\d\d:\d\d, [1-5] of 6 runs ended, "
                       r"about \d:\d\d:\d\d left$", line) for line in lines)
  ready = [line for line in lines if re.match(r"worker \d \(pid \d+\): 2 cpu device", line)]
  assert len(ready) == 3  # workers 1 and 2, then the replacement of the killed one
  assert any(re.search(r"noise40_ann5/fedprox/seed0: starting in worker [12] \(pid", line)
             for line in lines)
  again = sweep.run_sweep(tiny_sweep(), str(workdir), "again", workers=2)
  assert (again.skipped, again.ran, again.failed) == (3, 1, [])  # the first two settings

  reference, _ = finished_sweep
  for setting, _ in TINY_SETTINGS:
    for method in ("fedavg", "fedprox"):
      run = pathlib.Path(setting, method, "seed0", "summary.json")
      ours, theirs = (json.loads((root / run).read_text()) for root in (workdir, reference))
      assert ours["test_at_best_val"] == theirs["test_at_best_val"], run
      assert ours["best_val_round"] == theirs["best_val_round"]


def _start_long_sweep(tmp_path):
  """A `--workers=2` sweep of 1000-round runs, started as from a terminal, once both workers'
  first runs have a checkpoint: (process, workdir, the two runs' checkpoint folders)."""
  config_file = tmp_path / "long_sweep.py"
  config_file.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "from conftest import tiny_config\n"
      "from test_sweep import tiny_sweep\n\n\n"
      "def get_config():\n"
      "  return tiny_sweep(base=tiny_config(**{'checkpoint.every': 1, 'rounds': 1000}))\n")
  workdir = tmp_path / "w"
  args = [sys.executable, "-m", "fednml_jax.sweep", f"--config={config_file}",
          f"--workdir={workdir}", "--workers=2"]
  # A shell's background job (as in CI) starts with SIGINT ignored, and so would the sweep: undo
  # that before exec'ing it (a preexec_fn would fork this multithreaded JAX process).
  restore_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                    "os.execv(sys.executable, sys.argv[1:])")
  env = dict(os.environ, FEDNML_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", restore_sigint, *args], cwd=REPO, env=env,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  runs = [workdir / "noise20_ann7" / method / "seed0" / "checkpoints"
          for method in ("fedavg", "fedprox")]
  deadline = time.time() + 120
  try:
    while not all(run.is_dir() and any(run.iterdir()) for run in runs):
      assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
      time.sleep(0.2)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)
    raise
  return proc, workdir, runs


def _assert_stopped_cleanly(runs, err):
  """The runs stopped between checkpoints: no half-written checkpoint, no lock, no summary. `err`:
  the sweep's stderr (its workers' too), shown when not."""
  for run in runs:
    assert not list(run.glob("*tmp*")), (sorted(p.name for p in run.iterdir()), err[-4000:])
    assert not (run.parent / "summary.json").exists() and not (run.parent / ".running").exists()


def test_ctrl_c_stops_the_workers_after_their_checkpoints_and_exits_130(tmp_path):
  """Ctrl-C (SIGINT to the terminal's process group) during a `--workers=2` sweep: both workers'
  runs stop with complete checkpoints (no half-written one), the workers exit, the tables are
  written, exit code 130; the next invocation resumes both runs."""
  proc, workdir, runs = _start_long_sweep(tmp_path)
  try:
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:  # leave no process behind when the test fails
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "sweep interrupted after" in err
  for pid in re.findall(r"worker \d \(pid (\d+)\)", err):
    with pytest.raises(ProcessLookupError):
      os.kill(int(pid), 0)
  _assert_stopped_cleanly(runs, err)
  assert "0 of 4 runs finished" in (workdir / "table.md").read_text()
  _, planned = sweep.plan(tiny_sweep(base=tiny_config(**{"checkpoint.every": 1, "rounds": 1000})),
                          str(workdir))
  assert [r.status for r in planned] == ["resume", "resume", "start", "start"]


def test_workers_stop_after_their_checkpoints_when_the_sweep_process_is_killed(tmp_path):
  """SIGKILL to the sweep's own process (not its workers): each worker gets a SIGINT from the
  kernel (Linux's parent-death signal) and stops as for Ctrl-C, instead of training on for no
  one."""
  proc, _, runs = _start_long_sweep(tmp_path)
  pids = [json.loads((run.parent / ".running").read_text())["pid"] for run in runs]
  try:
    proc.kill()
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 60
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.time() < deadline:
      time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids), "workers still running"
  finally:
    for pid in pids:
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
  _assert_stopped_cleanly(runs, err)


def test_each_worker_gets_one_visible_gpu_or_a_share_of_one(monkeypatch):
  from fednml_jax import sweep_workers
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert sweep_workers.worker_devices(3) == ["0", "1", "2"]
  assert sweep_workers.worker_devices(5, per_gpu=2) == ["0", "0", "1", "1", "2"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
  assert sweep_workers.worker_devices(2) == ["3", "5"]
  assert sweep_workers.worker_devices(4, per_gpu=3) == ["3", "3", "3", "5"]
  with pytest.raises(ConfigError, match=r"--workers=3 with --workers_per_gpu=1 needs 3 GPUs, but "
                     r"CUDA_VISIBLE_DEVICES='3, 5' makes 2 visible: use at most --workers=2"):
    sweep_workers.worker_devices(3)
  assert sweep_workers.worker_environment("5", 1) == {"CUDA_VISIBLE_DEVICES": "5"}
  assert sweep_workers.worker_environment("5", 4) == {"CUDA_VISIBLE_DEVICES": "5",
                                                      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.1")  # the user's choice stays
  assert sweep_workers.worker_environment("5", 4) == {"CUDA_VISIBLE_DEVICES": "5"}


# Errors and config resolution -------------------------------------------------------------------

def test_unknown_methods_exit_2_with_one_paragraph(tmp_path):
  config_file = write_sweep_file(tmp_path / "tiny_sweep.py", ("fedavg", "fedfoo", "fedbar"))
  done = run_cli([f"--config={config_file}", f"--workdir={tmp_path / 'w'}"])
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert "Unknown method(s) in the sweep: fedfoo, fedbar" in done.stderr
  from fednml_jax.methods import METHODS
  assert "Valid methods are " + ", ".join(sorted(METHODS)) in done.stderr
  assert not (tmp_path / "w").exists()
  done = run_cli([f"--config={config_file}", f"--workdir={tmp_path / 'w'}", "--workers=0"])
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert "error: bad command line: flag --workers=0: 0 is not a positive integer" in done.stderr


def test_bad_settings_are_refused_before_running(tmp_path):
  def planned(**fields):
    return sweep.plan(tiny_sweep(**fields), str(tmp_path))

  with pytest.raises(ConfigError, match=r"labels\.noise_rat.*did you mean 'labels\.noise_rate'"):
    planned(settings=(("a", {"labels.noise_rat": 0.2}),))
  with pytest.raises(ConfigError, match=r"noise_rate.*\[0, 1\)"):
    planned(settings=(("a", {"labels.noise_rate": 1.5}),))
  with pytest.raises(ConfigError, match="folder names"):
    planned(settings=(("a/b", {}),))
  with pytest.raises(ConfigError, match="more than once"):
    planned(seeds=(0, 0))
  with pytest.raises(ConfigError, match="Unknown method.*fedmagic"):
    planned(method_overrides=(("fedmagic", {"optim.lr": 0.1}),))
  # Overrides of a registered method the sweep does not run (narrowed --config.methods) are unused.
  planned(method_overrides=(("fednml", {"optim.lr": 0.1}),))


def test_missing_num_and_method_overrides_are_resolved(tmp_path):
  from fednml_jax.data import load_dataset
  num_classes = load_dataset(tiny_config().data).num_classes
  config = tiny_sweep(settings=(("missing3", {"labels.missing_num": 3}),),
                      method_overrides=(("fedprox", {"optim.lr": 0.01, "fedprox.mu": 0.1}),))
  _, runs = sweep.plan(config, str(tmp_path))
  assert [(r.name, r.status) for r in runs] == [("missing3/fedavg/seed0", "start"),
                                                ("missing3/fedprox/seed0", "start")]
  assert [r.config.labels.annotation_num for r in runs] == [num_classes - 3] * 2
  assert [r.config.optim.lr for r in runs] == [3e-3, 0.01]
  assert runs[1].config.fedprox.mu == 0.1
  with pytest.raises(ConfigError, match=f"{num_classes} classes"):
    sweep.plan(tiny_sweep(settings=(("m", {"labels.missing_num": num_classes}),)), str(tmp_path))


@pytest.mark.parametrize("name, missing", [("rfmid_cpu", None), ("mured", (2, 4, 8)),
                                           ("rfmid", (4, 6, 8)), ("brset", (2, 4, 6))])
def test_sweep_configs(name, missing):
  """The shipped sweeps: the paper's settings, and run configs that validate (for the methods
  registered so far; the others are being written)."""
  import importlib.util
  from fednml_jax.methods import METHODS
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / "sweeps" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  grid = sweep.read_grid(config)
  assert grid.seeds == (0, 1, 2) and len(grid.methods) == 9 and grid.methods[-1] == "fednml"
  settings = dict(config.settings)
  assert [s["labels.noise_rate"] for s in settings.values()] == [0.2, 0.4, 0.6]
  if missing is None:
    assert [s["labels.annotation_num"] for s in settings.values()] == [7, 5, 3]
    assert config.base.data.path == "../shared/data/rfmid_dev_64px.npz"
  else:
    assert [s["labels.missing_num"] for s in settings.values()] == list(missing)
    assert config.base.rounds == 100 and config.base.model.name == "resnet18"
  for setting in grid.settings:
    for method in (m for m in grid.methods if m in METHODS):
      if missing is None:
        sweep.run_config(config, setting, method, 0, {})
      else:  # C is only known from the data: stand in a count
        sweep.run_config(config, setting, method, 0, {_data_key(config): 12})


def _data_key(config):
  from fednml_jax import config as config_lib
  return config_lib.to_json(config.base.data)
