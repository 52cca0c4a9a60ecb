r"""FedAvg/FedNML protocol on the shared 64-px RFMiD fundus file, sized for a 2-core CPU.

  python run.py --config=configs/rfmid64.py --workdir=runs/rfmid64 \
      --config.data.path=../shared/data/rfmid_dev_64px.npz --config.method=fednml \
      --config.labels.noise_rate=0.4 --config.labels.annotation_num=5

The paper's protocol (4 IID clients, 3 local epochs, batch 32, AdamW re-initialised each round,
instance-dependent noise, missing classes, 9 classes left after min_positives=20) with a small CNN
at 64 px and 30 rounds, so that one run fits in 10 minutes on a 2-core CPU. The data are RFMiD
(Pachade et al., Data 2021, CC BY 4.0); see ../shared/data/README.md. The class-prior predictor scores
a test mAP of 0.158 on this test split. See docs/results.md for FedAvg vs FedNML here.
"""

from fednml_jax.config import cpu_setting


def get_config():
  return cpu_setting("../shared/data/rfmid_dev_64px.npz", annotation_num=7)
