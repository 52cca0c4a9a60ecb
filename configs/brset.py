r"""FedNML's paper setting on BRSET (Nakayama et al., PhysioNet 2023; 13 disease columns).

  python run.py --config=configs/brset.py --workdir=runs/brset --config.method=fednml \
      --config.labels.noise_rate=0.2 --config.labels.annotation_num=C_MINUS_M

Put the published files under data/brset/ (data/README.md gives the layout and where to get them);
images are resized once to 256 px and cached. 6 IID clients, 100 rounds, 3 local epochs,
batch 32, AdamW (lr 1e-4, weight decay 1e-4) re-initialised every round, ResNet-18. The paper's
settings are Missing 2 / 4 / 6: set annotation_num to C − m, where C is the number of classes left after
dropping those with fewer than 20 training positives (logged at start-up; the run refuses values
outside 1..C). Sized for an accelerator: on a CPU one run takes many hours.
"""

from fednml_jax.config import paper_setting


def get_config():
  return paper_setting("brset", num_clients=6)
