"""Tasks: the model head, the supervised loss and the metrics, pluggable into the engine."""

from fednml_jax.errors import ConfigError
from fednml_jax.tasks.multilabel import MultiLabelTask
from fednml_jax.tasks.singlelabel import SingleLabelTask

TASKS = {"multilabel": MultiLabelTask, "singlelabel": SingleLabelTask}


def get_task(name: str):
  if name not in TASKS:
    raise ConfigError(f"Unknown task {name!r}; config.task must be one of {sorted(TASKS)}.")
  return TASKS[name]()
