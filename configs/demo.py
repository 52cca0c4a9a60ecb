r"""Demo: FedAvg vs FedNML on the embedded digit mosaics, 40% label noise, 3 of 10 classes
unannotated per client.

  python run.py --config=configs/demo.py --workdir=/tmp/fednml_demo

No download: the data are multi-label mosaics of scikit-learn's handwritten digits (32×32 grey,
10 classes of uneven frequency). 4 clients, a small CNN, 20 rounds (FedNML: 10 warm-up rounds,
refinements at rounds 10 and 15). Each method runs in its own folder under the workdir; the table
compares them. About 2 minutes on a 2-core CPU. Run one method with --config.compare="".
"""

from fednml_jax.config import base_config


def get_config():
  c = base_config()
  c.method = "fedavg"
  c.compare = "fedavg,fednml"
  c.rounds = 20
  c.data.source = "embedded"
  c.labels.noise_rate = 0.4
  c.labels.annotation_num = 7
  c.fl.num_clients = 4
  c.fl.local_epochs = 1
  c.fl.batch_size = 32
  c.optim.lr = 3e-3
  c.model.name = "small_cnn"
  c.model.width = 32
  c.eval.every = 2
  return c
