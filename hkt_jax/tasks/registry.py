"""The task registry: ``task=NAME`` in a config picks the class registered under NAME.

A task registers itself where it is defined, in one line::

    @register_task
    @dataclasses.dataclass(frozen=True)
    class MyTask(Task):
        name: str = "my_task"
        ...

so nothing else (the config, the trainer, the hooks) keeps a list of tasks.
"""

from __future__ import annotations

import types
from typing import Any, Mapping, TypeVar

from hkt_jax.tasks.base import Task

TaskClass = TypeVar("TaskClass", bound=type[Task])

_REGISTERED: dict[str, type[Task]] = {}
#: name -> Task class, in registration order (read-only: register with ``register_task``).
TASKS: Mapping[str, type[Task]] = types.MappingProxyType(_REGISTERED)


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator: makes ``cls`` the task ``task=<cls.name>`` selects; another class under a name that
    is taken is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task takes a Task subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or name == Task.name:
        raise ValueError(
            f"{cls.__name__}: give the task its own name (a class field, e.g. name: str = 'my_task') "
            "before registering it"
        )
    registered = _REGISTERED.get(name)
    # The same definition run again (a reloaded module, a notebook cell) replaces the class it made before.
    if registered is not None and _where(registered) != _where(cls):
        raise ValueError(f"task name {name!r} is taken by {_where(registered)}; give {_where(cls)} another name")
    _REGISTERED[name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    """The class registered as ``name``; an unknown name is an error listing the registered ones."""
    try:
        return _REGISTERED[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"task={name!r}: expected one of {tuple(_REGISTERED)} (a new task registers itself with "
            "@hkt_jax.tasks.register_task)"
        ) from None


def make_task(config: Any, settings_from: Any = None) -> Task:
    """The task an experiment config asks for (``config.task``, with ``config.task_settings``).

    ``make_task("flow")`` gives a task by name with its default settings; ``make_task(name, config)``
    (the older form) is ``make_task(config)`` for a config whose task is ``name``.
    """
    if isinstance(config, str):
        cls = task_class(config)
        if settings_from is None:
            return cls()
        if getattr(settings_from, "task", config) != config:
            raise ValueError(f"make_task({config!r}, config): the config is for task={settings_from.task!r}")
        return cls.from_config(settings_from)
    return task_class(config.task).from_config(config)


def feature_distillation_tasks() -> tuple[str, ...]:
    """Registered tasks whose networks give spatial feature maps at stage ends (method=fitnet / at)."""
    return tuple(name for name, cls in _REGISTERED.items() if cls.feature_distillation)
