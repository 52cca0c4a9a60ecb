r"""Tables of results from many run folders: mean ± std over seeds, per method and setting.

  python -m fednml_jax.report --runs=runs/rfmid64 --out=table.md

Reads every `summary.json` below `--runs` (one folder per run) and groups runs by
(dataset, noise_rate, annotation_num) and method; each cell is the mean ± standard deviation over
seeds of a test metric at the best-validation round (or `--at=final`). Refinement diagnostics of
methods that log them (FedNML) are averaged over seeds per refinement round.

The results table's grouping (`group_metrics`) and layout (`metrics_table`, FedNML's Table II:
one block of mAP, F1, Recall, BAcc columns per setting; `metrics_csv`) also make the tables of
`python -m fednml_jax.sweep`.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import pathlib

import numpy as np
from absl import app, flags, logging

METRICS = ("mAP", "F1", "Recall", "BAcc")
DIAGNOSTICS = ("flagged", "noisy_precision", "noisy_recall", "corrupted_label_acc_before",
               "corrupted_label_acc", "missing_label_acc_before", "missing_label_acc",
               "positive_label_recall_before", "positive_label_recall", "hard_fraction")
MISSING = "—"  # a table cell without any finished run


def _variant(summary: dict, workdir: pathlib.Path) -> str:
  """The method's name plus any of its own constants (`config.<method>.*`) that differ from their
  defaults, e.g. `fednml[reference_label_init=True]`, so ablations get rows of their own."""
  from fednml_jax import config as config_lib  # noqa: PLC0415
  method = summary["method"]
  path = workdir / "config.json"
  if not path.exists():
    return method
  with open(path) as f:
    saved = config_lib.flatten(json.load(f))
  defaults = config_lib.flatten(config_lib.base_config())
  changed = [f"{k.split('.', 1)[1]}={v}" for k, v in sorted(saved.items())
             if k.startswith(method + ".") and k in defaults and v != defaults[k]]
  return f"{method}[{', '.join(changed)}]" if changed else method


def load_run(folder) -> dict | None:
  """The `summary.json` of the run in `folder`, with the folder as `workdir` and `method` as the
  method's variant label (see `_variant`); None when the run has not finished."""
  folder = pathlib.Path(folder)
  path = folder / "summary.json"
  if not path.exists():
    return None
  with open(path) as f:
    summary = json.load(f)
  summary["workdir"] = str(folder)
  summary["method"] = _variant(summary, folder)
  return summary


def load_runs(root: str) -> list[dict]:
  """The summaries under `root` (see `load_run`; unfinished runs skipped)."""
  return [load_run(path.parent) for path in sorted(pathlib.Path(root).rglob("summary.json"))]


def _records(run: dict):
  """The metrics.jsonl records of a run (none when the file is absent)."""
  path = os.path.join(run["workdir"], "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      yield from (json.loads(line) for line in f)


def _mean_std(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  return float(np.mean(values)), float(np.std(values)), len(values)


def group_metrics(runs: list[dict], row_of, block_of, at: str = "test_at_best_val") -> dict:
  """{(row, block): {metric: (mean, std, count)}} for each of METRICS over the runs that share
  `row_of(run)` (e.g. the method) and `block_of(run)` (e.g. the setting): the mean and population
  standard deviation over seeds of `run[at][metric]`, and how many runs gave a value."""
  groups = collections.defaultdict(list)
  for r in runs:
    groups[(row_of(r), block_of(r))].append(r)
  return {key: {m: _mean_std([(r[at] or {}).get(m) for r in group]) for m in METRICS}
          for key, group in groups.items()}


def _best_per_column(rows, blocks, stats) -> dict:
  """{(block, metric): the highest mean over `rows`, at the printed precision}."""
  best = {}
  for block, _ in blocks:
    for m in METRICS:
      means = [stats[(row, block)][m][0] for row in rows if (row, block) in stats]
      means = [round(v, 3) for v in means if v is not None]
      if means:
        best[(block, m)] = max(means)
  return best


def metrics_table(rows: list, blocks: list[tuple], stats: dict, seeds: int | None = None,
                  bold_best: bool = False) -> str:
  """Markdown laid out like FedNML's Table II: one row per entry of `rows` (methods, in order) and
  one block of columns mAP, F1, Recall, BAcc per `(block, title)` of `blocks` (settings, in order).

  `stats` is `group_metrics`' output. A cell is `mean ± std` (the value alone for a single run),
  followed by `(n=k)` when `seeds` is
  None or only k < `seeds` runs gave a value; MISSING marks a cell without runs. With `bold_best`,
  the highest mean of each column (ties at the printed precision included) is in bold.
  """
  best = _best_per_column(rows, blocks, stats) if bold_best else {}
  titles = [cell for _, title in blocks for cell in [title] + [""] * (len(METRICS) - 1)]
  lines = ["| " + " | ".join(["method"] + titles) + " |",
           "|---|" + ":---:|" * len(titles),
           "| | " + " | ".join(m for _ in blocks for m in METRICS) + " |"]
  for row in rows:
    cells = [str(row)]
    for block, _ in blocks:
      for m in METRICS:
        mean, std, count = stats.get((row, block), {}).get(m, (None, None, 0))
        if mean is None:
          cells.append(MISSING)
          continue
        value = f"**{mean:.3f}**" if best.get((block, m)) == round(mean, 3) else f"{mean:.3f}"
        cell = value if count == 1 else f"{value} ± {std:.3f}"  # one run has no spread
        if seeds is None or count < seeds:
          cell += f" (n={count})"
        cells.append(cell)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def metrics_csv(rows: list, blocks: list[tuple], stats: dict) -> str:
  """The cells of `metrics_table` as CSV: `method`, then per block title and metric the columns
  `<title>/<metric>/mean`, `.../std` and `.../n` (number of runs); mean and std are empty where
  no run gave a value."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["method"] + [f"{title}/{m}/{stat}" for _, title in blocks for m in METRICS
                                for stat in ("mean", "std", "n")])
  for row in rows:
    cells = [row]
    for block, _ in blocks:
      for m in METRICS:
        mean, std, count = stats.get((row, block), {}).get(m, (None, None, 0))
        cells += ["", "", 0] if mean is None else [mean, std, count]
    writer.writerow(cells)
  return out.getvalue()


def class_prior_note(runs: list[dict], block_of, blocks: list[tuple]) -> str:
  """One line: the class-prior predictor's test mAP per block (mean over the block's runs)."""
  prior = collections.defaultdict(list)
  for r in runs:
    prior[block_of(r)].append(r["test_class_prior"]["mAP"])
  return "Class-prior predictor, test mAP: " + ", ".join(
      f"{np.mean(prior[block]):.3f}" if prior[block] else MISSING for block, _ in blocks
  ) + " (per setting, as above)."


def results_table(runs: list[dict], at: str = "test_at_best_val") -> str:
  """Markdown: rows = methods, one block of columns per (noise, annotated classes) setting."""
  setting_of = lambda r: (r["noise_rate"], r["annotation_num"])  # noqa: E731
  blocks = [(s, f"noise {s[0]:g}, {s[1]} annotated") for s in sorted({setting_of(r) for r in runs})]
  methods = sorted({r["method"] for r in runs})
  stats = group_metrics(runs, lambda r: r["method"], setting_of, at)
  return (metrics_table(methods, blocks, stats) + "\n\n"
          + class_prior_note(runs, setting_of, blocks))


def refinement_diagnostics(runs: list[dict]) -> str:
  """Markdown: per setting and refinement round, diagnostics averaged over seeds."""
  rows = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in runs:
    for rec in _records(r):
      if rec.get("kind") == "refinement" and "overall" in rec:
        key = (r["method"], r["noise_rate"], r["annotation_num"], rec["round"])
        for d in DIAGNOSTICS:
          rows[key][d].append(rec["overall"].get(d))
  if not rows:
    return "(no refinement records)"
  lines = ["| method | noise | annotated | round | " + " | ".join(DIAGNOSTICS) + " |",
           "|" + "---|" * (4 + len(DIAGNOSTICS))]
  for key in sorted(rows):
    values = []
    for d in DIAGNOSTICS:
      mean, _, _ = _mean_std(rows[key][d])
      values.append("–" if mean is None else (f"{mean:.0f}" if d == "flagged" else f"{mean:.3f}"))
    lines.append("| " + " | ".join([key[0], f"{key[1]:g}", str(key[2]), str(key[3])] + values)
                 + " |")
  return "\n".join(lines)


def trajectory_table(runs: list[dict], split: str = "val") -> str:
  """Markdown: mean `split` mAP over seeds at every evaluated round, per method and setting."""
  curves = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in runs:
    for rec in _records(r):
      if rec.get("split") == split and rec["metrics"]["mAP"] is not None:
        curves[(r["method"], r["noise_rate"], r["annotation_num"])][rec["round"]].append(
            rec["metrics"]["mAP"])
  rounds = sorted({rnd for curve in curves.values() for rnd in curve})
  lines = ["| method | noise | annotated | " + " | ".join(f"r{rnd}" for rnd in rounds) + " |",
           "|" + "---|" * (3 + len(rounds))]
  for key in sorted(curves):
    cells = [f"{np.mean(curves[key][rnd]):.3f}" if curves[key].get(rnd) else "–" for rnd in rounds]
    lines.append("| " + " | ".join([key[0], f"{key[1]:g}", str(key[2])] + cells) + " |")
  return "\n".join(lines)


def label_table_quality(runs: list[dict]) -> str:
  """Markdown: how the label tables of FedNML runs ended, read from each run's last checkpoint.

  Per setting, mean over seeds of the recall of true positives in the table (Ŷ > 0.5 where the
  clean label is 1) on annotated entries at the start and at the end of the run, and on
  missing-class entries at the end. Rebuilds each run's simulation from its config and seed.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415  (only this table needs checkpoints)

  from fednml_jax import config as config_lib  # noqa: PLC0415
  from fednml_jax import train  # noqa: PLC0415

  rows = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in runs:
    if not r["method"].startswith("fednml"):
      continue
    with open(os.path.join(r["workdir"], "config.json")) as f:
      config = config_lib.from_saved(json.load(f))
    experiment = train.Experiment(config)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(r["workdir"], "checkpoints")))
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]["method_state"]
    manager.close()
    layout, setup = experiment.layout, experiment.setup
    clean = layout.gather(setup.clean_labels) > 0.5
    real = layout.valid[:, :, None]
    annotated = real & setup.annotated[:, None, :]
    missing = real & ~setup.annotated[:, None, :]
    start = experiment.method.init_state()["label_table"] > 0.5
    end = np.asarray(state["label_table"]) > 0.5
    key = (r["noise_rate"], r["annotation_num"], bool(config.fednml.reference_label_init),
           bool(config.fednml.refine_labels))
    rows[key]["start"].append((start & clean & annotated).sum() / (clean & annotated).sum())
    rows[key]["end"].append((end & clean & annotated).sum() / (clean & annotated).sum())
    rows[key]["missing_end"].append((end & clean & missing).sum() / max((clean & missing).sum(), 1))
  lines = ["| noise | annotated | reference_label_init | refine_labels | positive recall, start | "
           "positive recall, end | missing-class positive recall, end | runs |",
           "|---|---|---|---|---|---|---|---|"]
  for key in sorted(rows):
    v = rows[key]
    lines.append(f"| {key[0]:g} | {key[1]} | {key[2]} | {key[3]} | {np.mean(v['start']):.3f} | "
                 f"{np.mean(v['end']):.3f} | {np.mean(v['missing_end']):.3f} | {len(v['end'])} |")
  return "\n".join(lines)


_RUNS = flags.DEFINE_list("runs", None, "Folder(s) whose sub-folders are run workdirs.")
_OUT = flags.DEFINE_string("out", None, "Markdown file to write (default: print).")
_AT = flags.DEFINE_enum("at", "best_val", ["best_val", "final"], "Which round's test metrics.")
_LABEL_TABLES = flags.DEFINE_bool("label_tables", False, "Also read FedNML runs' final label "
                                  "tables from their checkpoints (rebuilds each simulation).")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint it reads at INFO
  runs = [run for root in _RUNS.value for run in load_runs(root)]
  if not runs:
    raise app.UsageError(f"no summary.json below {_RUNS.value}")
  at = "test_at_best_val" if _AT.value == "best_val" else "test_final"
  text = (f"Test metrics at the {'best-validation' if at != 'test_final' else 'final'} round, "
          f"mean ± std over seeds ({len(runs)} runs of {runs[0]['dataset']}).\n\n"
          + results_table(runs, at) + "\n\nRefinement diagnostics (overall, mean over seeds):\n\n"
          + refinement_diagnostics(runs) + "\n\nValidation mAP by round (mean over seeds):\n\n"
          + trajectory_table(runs, "val") + "\n")
  if _LABEL_TABLES.value:
    text += ("\nFedNML label tables (true-positive recall, from the last checkpoint):\n\n"
             + label_table_quality(runs) + "\n")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  print(text)


if __name__ == "__main__":
  flags.mark_flag_as_required("runs")
  app.run(main)
