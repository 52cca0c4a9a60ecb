r"""FedNML's paper protocol on MuReD: its Table II, 9 methods × 3 settings × 3 seeds (81 runs).

  python -m fednml_jax.sweep --config=configs/sweeps/mured.py --workdir=runs/sweep_mured

Data: MuReD (Multi-label Retinal Diseases, Rodríguez et al., Data in Brief 2022; 20 label columns),
under data/mured/ (data/README.md says where to get it and the layout). Base:
`paper_setting("mured", num_clients=4)` as in configs/mured.py (4 IID clients, 100 rounds, 3 local
epochs, batch 32, AdamW lr 1e-4 re-initialised every round, ResNet-18 at 256 px). Settings, as in
the paper's Table II: 20% noise with Missing 2, 40% with Missing 4, 60% with Missing 8. "Missing m"
means labels.annotation_num = C − m, where C is the number of classes left after dropping those with
fewer than 20 training positives. C is only known once the data are loaded, so the settings give
`labels.missing_num` and the sweep loads the data once at start-up to resolve it (the resolved
annotation_num is in each run's config.json). Seeds 0, 1, 2.

Time: not measured yet. Sized for an accelerator (one run is 100 rounds of ResNet-18 at 256 px); on
a CPU one run takes many hours. Narrow the grid with e.g. `--config.methods=fedavg,fednml
--config.seeds=0`. Methods not registered in fednml_jax.methods.METHODS yet are refused up front.
Rerunning the command skips finished runs and resumes the interrupted one. Writes
runs/sweep_mured/table.md and table.csv.
"""

from fednml_jax.sweep import paper_sweep


def get_config():
  return paper_sweep("mured", num_clients=4, missing_by_noise=((0.2, 2), (0.4, 4), (0.6, 8)))
