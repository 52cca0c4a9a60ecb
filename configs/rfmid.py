r"""FedNML's paper setting on RFMiD (Pachade et al., Data 2021; 45 disease columns).

  python run.py --config=configs/rfmid.py --workdir=runs/rfmid --config.method=fednml \
      --config.labels.noise_rate=0.2 --config.labels.annotation_num=C_MINUS_M

Put the published files under data/rfmid/ (data/README.md gives the layout and where to get them);
images are resized once to 256 px and cached. 4 IID clients, 100 rounds, 3 local epochs,
batch 32, AdamW (lr 1e-4, weight decay 1e-4) re-initialised every round, ResNet-18. The paper's
settings are Missing 4 / 6 / 8: set annotation_num to C − m, where C is the number of classes left after
dropping those with fewer than 20 training positives (logged at start-up; the run refuses values
outside 1..C). Sized for an accelerator: on a CPU one run takes many hours.
"""

from fednml_jax.config import paper_setting


def get_config():
  return paper_setting("rfmid", num_clients=4)
