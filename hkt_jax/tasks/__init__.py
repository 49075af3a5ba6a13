"""Tasks: what a training problem supplies to the generic training core (see ``tasks.base``).

Each task module registers its class with ``@register_task``; importing this package imports the
built-in ones, so ``TASKS`` lists them.
"""

from hkt_jax.tasks.base import Task, choose_inherit_loss
from hkt_jax.tasks.registry import TASKS, make_task, register_task, task_class
from hkt_jax.tasks.classification import Classification
from hkt_jax.tasks.flow import Flow
from hkt_jax.tasks.segmentation import Segmentation
from hkt_jax.tasks.toy_segmentation import ToySegmentation

#: what ``task=`` is when a config does not say: the paper's CIFAR experiment.
DEFAULT_TASK = Classification.name

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "Classification",
    "Flow",
    "Segmentation",
    "Task",
    "ToySegmentation",
    "choose_inherit_loss",
    "make_task",
    "register_task",
    "task_class",
]
