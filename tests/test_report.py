"""The results tables built from run folders (mean ± std over seeds, variant labels)."""

import json

from fednml_jax import report
from fednml_jax.config import base_config


def _fake_run(root, name, method, seed, m_ap, **method_overrides):
  folder = root / name
  folder.mkdir(parents=True)
  config = base_config()
  config.method, config.seed = method, seed
  for key, value in method_overrides.items():
    config[method][key] = value
  (folder / "config.json").write_text(json.dumps(config.to_dict()))
  block = {"mAP": m_ap, "F1": 0.1, "Recall": 0.2, "BAcc": 0.5, "Precision": 0.1, "AUROC": 0.6}
  summary = {"method": method, "dataset": "toy", "seed": seed, "noise_rate": 0.4,
             "annotation_num": 5, "test_at_best_val": block, "test_final": block,
             "test_class_prior": dict(block, mAP=0.15)}
  (folder / "summary.json").write_text(json.dumps(summary))


def test_mean_std_over_seeds_and_ablations_get_their_own_rows(tmp_path):
  _fake_run(tmp_path, "a0", "fedavg", 0, 0.30)
  _fake_run(tmp_path, "a1", "fedavg", 1, 0.40)
  _fake_run(tmp_path, "n0", "fednml", 0, 0.20)
  _fake_run(tmp_path, "l0", "fednml", 0, 0.50, reference_label_init=True)
  runs = report.load_runs(str(tmp_path))
  assert sorted(r["method"] for r in runs) == [
      "fedavg", "fedavg", "fednml", "fednml[reference_label_init=True]"]
  table = report.results_table(runs)
  assert "| fedavg | 0.350 ± 0.050 (n=2)" in table  # mean and population std of 0.30, 0.40
  assert "| fednml[reference_label_init=True] | 0.500 (n=1)" in table
