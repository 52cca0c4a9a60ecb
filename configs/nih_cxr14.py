r"""The paper's protocol on the shared 1,000-image NIH ChestX-ray14 file, sized for a 2-core CPU.

  python run.py --config=configs/nih_cxr14.py --workdir=runs/nih \
      --config.data.path=../shared/data/nih_cxr14_1000_64px.npz --config.method=fedavg

Grey 64-px chest X-rays, 10 classes after min_positives=20 (Mass and Pleural_Thickening drop out).
Hard data: a centrally trained small CNN reaches a test mAP of only 0.11-0.14 against 0.10 for the
class prior, so use it for robustness checks more than for ranking methods. Data: Wang et al.,
CVPR 2017, NIH Clinical Center (see ../shared/data/README.md). Under 10 minutes on a 2-core CPU.
"""

from fednml_jax.config import cpu_setting


def get_config():
  return cpu_setting("../shared/data/nih_cxr14_1000_64px.npz", annotation_num=8)
