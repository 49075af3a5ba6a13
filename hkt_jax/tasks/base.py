"""What a training problem supplies to the generic training core.

The loop (``hkt_jax.training.train``), the methods (``hkt_jax.training.methods``) and the HKT
engine (``hkt_jax.engine.hkt``) know nothing about labels, logits or image sizes: a
``Task`` says how a batch becomes network input, which losses supervise the
network's output, what to log during training, how to sum and finish an
evaluation pass, which metric picks the best model, and which images are
worth logging. Classification is one Task; flow and segmentation are others.

A Task is a stateless, hashable value: it is closed over by jit-compiled steps.
It owns its settings too: ``settings_type`` is the frozen dataclass a config
carries as ``task_settings`` (written ``<settings_key>.*`` on the command line
and in ``config.json``), handed to the task as its ``settings`` field. A task
registers itself with ``@register_task`` (``hkt_jax.tasks.registry``).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Literal, Mapping

import jax
import numpy as np

from hkt_jax.data.stream import Datasets

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch], jax.Array]


class Task(abc.ABC):
    """The per-problem half of a training run (see the module docstring)."""

    name: str = "task"
    #: key of ``finish_eval``'s result that selects the best model, and whether higher is better.
    selection_metric: str = "loss"
    selection_mode: Literal["max", "min"] = "min"
    #: the frozen dataclass of this task's own settings (``config.task_settings``), None = it has none.
    settings_type: ClassVar[type | None] = None
    #: the key of those settings on the command line and in ``config.json`` (None: the task's name).
    settings_key: ClassVar[str | None] = None
    #: whether the networks give (B, H, W, C) maps at their stage ends that method=fitnet / at can compare.
    feature_distillation: ClassVar[bool] = False

    @classmethod
    def settings_name(cls) -> str:
        return cls.settings_key or cls.name

    @classmethod
    def from_config(cls, config: Any) -> Task:
        """The task an experiment config asks for; a task with ``settings_type`` gets ``config.task_settings``
        as its ``settings`` field."""
        return cls() if cls.settings_type is None else cls(settings=config.task_settings)

    # -- data and models ------------------------------------------------------------------------

    @abc.abstractmethod
    def make_datasets(
        self,
        data_config: Any,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> Datasets:
        """This process's data (``hkt_jax.data.stream.Datasets``): the resumable train stream (``.train``
        with ``get_state``/``set_state``), ``eval_batches(split)``, ``num_train`` / ``num_validation`` /
        ``num_test``; task-specific facts (classes, shapes) as attributes of the concrete class."""

    def model_kwargs(self, datasets: Any) -> dict[str, Any]:
        """Constructor arguments the data decides (e.g. the number of classes)."""
        return {}

    @abc.abstractmethod
    def example_input(self, datasets: Any, batch_size: int = 2) -> Any:
        """Zeros shaped like one network input of ``batch_size`` examples (for ``init``)."""

    def model_input(self, batch: Batch) -> Any:
        """The part of a batch the networks see."""
        return batch["image"]

    # -- losses ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def task_loss(self, outputs: Any, batch: Batch) -> jax.Array:
        """The native loss (L2 in HKT; the whole loss of a baseline)."""

    @abc.abstractmethod
    def inherit_loss_table(self) -> Mapping[str, LossFn]:
        """The losses ``hkt.inherit_loss`` may name for the inherited streams (L1, L3), by that name."""

    @property
    def inherit_losses(self) -> tuple[str, ...]:
        return tuple(self.inherit_loss_table())

    def inherit_loss(self, name: str) -> LossFn:
        """The loss of the inherited streams (L1, L3) named by ``hkt.inherit_loss``."""
        return choose_inherit_loss(self, name, self.inherit_loss_table())

    def distill_loss(
        self, student: Any, teacher: Any, batch: Batch, *, temperature: float, weight: float
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Knowledge distillation from the frozen parent's outputs: (loss, {"l2": task term, "l3": KD term})."""
        raise ValueError(f"method=kd is not defined for task {self.name!r}")

    # -- metrics --------------------------------------------------------------------------------

    def train_metrics(self, outputs: Any, batch: Batch) -> dict[str, jax.Array]:
        """Extra per-step training metrics (means over the batch)."""
        return {}

    @abc.abstractmethod
    def eval_sums(self, outputs: Any, batch: Batch) -> dict[str, jax.Array]:
        """Sums over the real (unpadded) examples of one eval batch; added up over batches."""

    @abc.abstractmethod
    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Totals of a whole pass -> the reported metrics (must include ``selection_metric``)."""

    def images_to_log(self, outputs: Any, batch: Batch) -> dict[str, np.ndarray]:
        """A few (H, W, 3) uint8 images worth showing in TensorBoard; none by default."""
        return {}

    def is_better(self, candidate: float, best: float | None) -> bool:
        if best is None:
            return True
        return candidate > best if self.selection_mode == "max" else candidate < best

    def startup_notes(self, config: Any) -> list[str]:
        """Lines the start-up block adds for this task, e.g. where its settings deviate from the paper."""
        return []

    def describe_data(self, datasets: Any) -> str:
        return f"{datasets.num_train} train / {datasets.num_validation} validation / {datasets.num_test} test examples"


def choose_inherit_loss(task: Task, name: str, table: Mapping[str, LossFn]) -> LossFn:
    """``table[name]``; a name the task does not take is an error naming the ones it does."""
    if name not in table:
        raise ValueError(f"hkt.inherit_loss={name!r}: task {task.name!r} takes one of {tuple(table)}")
    return table[name]
