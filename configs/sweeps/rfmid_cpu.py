r"""Table II on the shared 64-px RFMiD file, on a CPU: 9 methods × 3 settings × 3 seeds (81 runs).

  python -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py --workdir=runs/sweep_rfmid_cpu

Base: `cpu_setting` as in configs/rfmid64.py (../shared/data/rfmid_dev_64px.npz, 9 classes after
min_positives=20; 4 IID clients, 3 local epochs, batch 32, SmallCNN width 16, lr 1e-3, 30 rounds,
evaluation every 2 rounds). Settings (the table's column blocks): 20% noise with 7 of 9 classes
annotated (Missing 2), 40% with 5 (Missing 4), 60% with 3 (Missing 6). Seeds 0, 1, 2.

Schedules: the paper's runs have 100 rounds, these 30. FedNML and FedNoRo keep their 10-round
warm-up (as in docs/results.md); the methods whose first stage is longer than 10 rounds by default
get 10 here, so that every method spends 20 rounds in its noise-handling stage: FedMLP
(`stage1_rounds` 50 → 10), MaskedOptim (`warmup_rounds` 30 → 10), FedELC (20 → 10) and FedDC
(`preprocess_rounds` 5, `finetune_rounds` 50 → 10, then 15 rounds of usual training). With their
defaults, MaskedOptim and FedMLP would never leave their first stage in 30 rounds.

Time: one run takes roughly 5-10 minutes on a 2-core CPU (the 1-local-epoch runs of
docs/results.md took 3-5 minutes each), so the whole grid takes about half a day; narrow it with
e.g. `--config.methods=fedavg,fednml --config.seeds=0` or `--config.base.fl.local_epochs=1`.
Rerunning the command skips finished runs and resumes the interrupted one. Methods that are not
registered in fednml_jax.methods.METHODS yet are refused up front: drop them with --config.methods.
Writes runs/sweep_rfmid_cpu/table.md and table.csv.
"""

from fednml_jax.config import cpu_setting
from fednml_jax.sweep import sweep_config


def get_config():
  return sweep_config(
      base=cpu_setting("../shared/data/rfmid_dev_64px.npz", annotation_num=7),
      methods=("fedavg", "fedprox", "fednoro", "fedmlp", "fedlsm", "feddc", "maskedoptim",
               "fedelc", "fednml"),
      settings=(
          ("noise20_ann7", {"labels.noise_rate": 0.2, "labels.annotation_num": 7}),
          ("noise40_ann5", {"labels.noise_rate": 0.4, "labels.annotation_num": 5}),
          ("noise60_ann3", {"labels.noise_rate": 0.6, "labels.annotation_num": 3}),
      ),
      seeds=(0, 1, 2),
      method_overrides=(
          ("fedmlp", {"fedmlp.stage1_rounds": 10}),
          ("maskedoptim", {"maskedoptim.warmup_rounds": 10}),
          ("fedelc", {"fedelc.warmup_rounds": 10}),
          ("feddc", {"feddc.finetune_rounds": 10}),
      ))
