"""Tasks: what a training problem supplies to the generic training core (see ``tasks.base``)."""

from hkt_jax.tasks.base import Task
from hkt_jax.tasks.classification import Classification
from hkt_jax.tasks.flow import Flow
from hkt_jax.tasks.toy_segmentation import ToySegmentation

TASKS: dict[str, type[Task]] = {"classification": Classification, "flow": Flow, "toy_segmentation": ToySegmentation}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {tuple(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Classification", "Flow", "Task", "ToySegmentation", "make_task"]
