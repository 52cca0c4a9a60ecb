r"""Single-label example: FedAvg on the embedded single digits with 40% symmetric label noise.

  python run.py --config=configs/embedded_singlelabel.py --workdir=/tmp/fednml_singlelabel

No download: one handwritten digit (scikit-learn's scans) per 32×32 grey image, 10 balanced
classes (`data.source = "embedded_digits"`). Softmax head and cross-entropy (`task =
"singlelabel"`); every client annotates all classes; 40% of each client's labels are flipped to
another class (try `--config.labels.noise_type=pair` or `instance`, or FedCorr's heterogeneous
clients with `--config.labels.noise_rate=0 --config.labels.noisy_client_fraction=0.4
--config.labels.min_client_noise=0.5`). 4 clients, a small CNN, 10 rounds; the best round is
selected on validation accuracy. About 30 seconds on a 2-core CPU.
"""

from fednml_jax.config import base_config


def get_config():
  c = base_config()
  c.method = "fedavg"
  c.task = "singlelabel"
  c.rounds = 10
  c.data.source = "embedded_digits"
  c.labels.noise_type = "symmetric"
  c.labels.noise_rate = 0.4
  c.fl.num_clients = 4
  c.fl.local_epochs = 1
  c.fl.batch_size = 32
  c.optim.lr = 3e-3
  c.model.name = "small_cnn"
  c.model.width = 16
  c.augment.hflip = False  # a mirrored digit is not the same digit
  c.eval.every = 2
  return c
