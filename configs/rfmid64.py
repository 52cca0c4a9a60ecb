r"""FedAvg/FedNML protocol on the shared 64-px RFMiD fundus file, sized for a 2-core CPU.

  python run.py --config=configs/rfmid64.py --workdir=runs/rfmid64 \
      --config.data.path=../shared/data/rfmid_dev_64px.npz --config.method=fednml \
      --config.labels.noise_rate=0.4 --config.labels.annotation_num=5

The paper's protocol (4 IID clients, 3 local epochs, batch 32, AdamW re-initialised each round,
instance-dependent noise, missing classes, 9 classes left after min_positives=20) with a small CNN
at 64 px and fewer rounds, so that one run takes a few minutes on a 2-core CPU. The data are RFMiD
(Pachade et al., Data 2021, CC BY 4.0); see ../shared/data/README.md. A class-prior predictor scores
a test mAP of about 0.18 here.
"""

from fednml_jax.config import base_config


def get_config():
  c = base_config()
  c.method = "fedavg"
  c.rounds = 30
  c.data.source = "npz"
  c.data.path = "../shared/data/rfmid_dev_64px.npz"
  c.labels.noise_rate = 0.2
  c.labels.annotation_num = 7
  c.fl.num_clients = 4
  c.fl.local_epochs = 3
  c.fl.batch_size = 32
  c.optim.lr = 1e-3
  c.model.name = "small_cnn"
  c.model.width = 16
  c.eval.every = 2
  return c
