"""Tasks: what a training problem supplies to the generic training core (see ``tasks.base``)."""

from typing import Any

from hkt_jax.tasks.base import Task
from hkt_jax.tasks.classification import Classification
from hkt_jax.tasks.flow import Flow
from hkt_jax.tasks.segmentation import Segmentation
from hkt_jax.tasks.toy_segmentation import ToySegmentation

TASKS: dict[str, type[Task]] = {"classification": Classification, "toy_segmentation": ToySegmentation,
                                 "segmentation": Segmentation, "flow": Flow}


def make_task(name: str, config: Any = None) -> Task:
    """The task ``name``; given the experiment ``config``, with its task-specific settings."""
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {tuple(TASKS)}")
    return TASKS[name]() if config is None else TASKS[name].from_config(config)


__all__ = ["TASKS", "Classification", "Flow", "Segmentation", "Task", "ToySegmentation", "make_task"]
