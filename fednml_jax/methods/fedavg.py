"""FedAvg (McMahan et al., AISTATS 2017) on partially annotated multi-label data.

Each client minimises BCE-with-logits over the classes it annotates (the reference's
`criterion_(outputs, labels)[:, active_class_list].mean()`, `src/update_avg.py`), so unannotated
classes are neither positives nor negatives for it. The server averages client variables weighted by
sample count (`fl.client_weighting = "sample_count"`) or uniformly (`"uniform"`, as the reference's
`average_weights` does).
"""

from __future__ import annotations

from fednml_jax.methods.base import Method


class FedAvg(Method):
  name = "fedavg"

  def client_loss(self, phase, *, logits, batch, client, teacher_logits, scalars):
    del phase, teacher_logits, scalars
    return self.task.supervised_loss(logits, batch["targets"], client["class_mask"])
