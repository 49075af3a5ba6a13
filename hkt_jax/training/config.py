"""Experiment configuration: nested frozen dataclasses plus ``key=value`` overrides.

A config file (``experiments/configs/NAME.py``) defines ``get_config()``
returning an ``ExperimentConfig``; the command line then overrides any field
by its dotted path, e.g. ``train.steps=200 hkt.lam=0.5 hkt.alphas=0.2,0.6,0.2``.
Values are parsed by the type of the field they replace, and a path that does
not exist is an error listing the valid ones. The task's own settings
(``task_settings``, a dataclass the task defines) go by the task's key, e.g.
``seg.window=-200,250`` for segmentation.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from typing import Any, Literal, Sequence

from hkt_jax.data.pipeline import DataConfig
from hkt_jax.engine.hkt import HKTConfig
from hkt_jax.training.methods import METHODS
from hkt_jax.models.registry import config_fields
from hkt_jax.tasks import DEFAULT_TASK, TASKS, task_class


def _check(key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A network by architecture name; only the fields its architecture takes are used
    (``hkt_jax.models.registry.CONFIG_FIELDS``) and recorded."""

    arch: str = "cifar_resnet"
    depth: int = 20  # cifar_resnet, pocketnet
    shortcut: Literal["A", "B"] = "A"  # cifar_resnet
    conv_impl: Literal["auto", "xla", "cpu_kernel"] = "auto"  # cifar_resnet (hkt_jax.kernels.cpu_conv)
    widths: tuple[int, ...] = (8, 16)  # toy, unet, dense_unet
    strides: tuple[int, ...] = (1, 1)  # toy
    per_pixel: bool = False  # toy
    small: bool = False  # raft
    width: int = 32  # pocketnet

    def __post_init__(self):
        config_fields(self.arch)  # unknown architecture -> ValueError listing the known ones

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments this config sets (the task adds e.g. ``num_classes``)."""
        return {name: getattr(self, name) for name in config_fields(self.arch)}

    def record(self) -> dict[str, Any]:
        return {"arch": self.arch, **self.kwargs()}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: PyTorch SGD (L2 decay); adamw: decoupled decay (RAFT)
    learning_rate: float = 0.1  # the peak rate for one_cycle
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8  # adamw only
    schedule: Literal["multistep", "cosine", "constant", "one_cycle"] = "multistep"
    milestones: tuple[float, ...] = (100.0, 150.0)  # in epochs (multistep)
    decay_factor: float = 0.1
    warmup_epochs: float = 0.0  # cosine only

    pct_start: float = 0.05  # one_cycle: share of the steps spent rising to the peak (RAFT: 0.05)
    clip_norm: float | None = None  # clip gradients to this global norm first (RAFT: 1.0); None = off
    # He et al. 2016 (Sec. 4.2): ResNet-110 trains at lr/10 "until the training error is below 80% (about
    # 400 iterations)", then at lr; from 0.1 at step 0 it can stay at chance. The first
    # ``low_lr_warmup_steps`` steps run at learning_rate * low_lr_warmup_factor, then the schedule goes on
    # as usual - applied only when the trained network is a CIFAR ResNet at least ``low_lr_warmup_min_depth``
    # deep (``default``: a ResNet-110 parent gets it, the ResNet-20 child does not). 0 steps = off.
    low_lr_warmup_steps: int = 0
    low_lr_warmup_factor: float = 0.1
    low_lr_warmup_min_depth: int = 110

    def __post_init__(self):
        _check(
            "optim.learning_rate",
            self.learning_rate,
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            "a positive finite number",
        )
        _check("optim.momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)")
        _check("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check("optim.decay_factor", self.decay_factor, 0 < self.decay_factor <= 1, "in (0, 1]")
        _check("optim.warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0")
        _check("optim.low_lr_warmup_steps", self.low_lr_warmup_steps, self.low_lr_warmup_steps >= 0, ">= 0 (0: off)")
        _check("optim.low_lr_warmup_factor", self.low_lr_warmup_factor, 0 < self.low_lr_warmup_factor <= 1, "in (0, 1]")
        _check(
            "optim.low_lr_warmup_min_depth",
            self.low_lr_warmup_min_depth,
            self.low_lr_warmup_min_depth >= 0,
            ">= 0 (0: every network)",
        )
        _check(
            "optim.milestones",
            self.milestones,
            all(m > 0 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
            "positive epochs in increasing order",
        )


@dataclasses.dataclass(frozen=True)
class HKTSettings(HKTConfig):
    """The engine's ``HKTConfig`` (defaults: the paper's) plus where the models are cut into stages."""

    stage_split: Literal["paper", "groups"] = "paper"
    # What the native stream's L2 learns from. "labels": the task loss (the paper). "parent": the task's
    # distillation loss from the frozen parent's own outputs, with kd.temperature and kd.weight (HKT + KD:
    # the parent's soft targets on top of the inherited streams).
    native_target: Literal["labels", "parent"] = "labels"
    # Aligned blocks to mix between, for models that define ``hkt_boundaries(stages)`` (RAFT: 3 = 3HKT,
    # 2 = 2HKT); None = the model's default wiring.
    stages: int | None = None
    # Stage boundaries by submodule path (hkt_jax.models.Tapped), for models without staging code; empty =
    # the model's own stages. Tapping one side only: the other side's stage names must match.
    child_taps: tuple[str, ...] = ()
    parent_taps: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class KDSettings:
    temperature: float = 4.0
    weight: float = 0.9  # weight of the distillation term; 1 - weight goes to cross-entropy

    def __post_init__(self):
        _check("kd.temperature", self.temperature, self.temperature > 0, "> 0")
        _check("kd.weight", self.weight, 0 <= self.weight <= 1, "in [0, 1]")


COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class FitNetSettings:
    """method=fitnet: one-stage FitNets hint (Romero et al. 2015) as in CRD's benchmark (Tian et al. 2020):
    CE + weight * MSE at the end of ``stage`` (FitNets: a middle layer; CRD: weight 100, the middle group)."""

    weight: float = 100.0
    stage: str = "group2"  # the stage whose end gives the hint (CifarResNet: group1 | group2 | group3)

    def __post_init__(self):
        _check("fitnet.weight", self.weight, self.weight >= 0 and math.isfinite(self.weight), ">= 0")


@dataclasses.dataclass(frozen=True)
class ATSettings:
    """method=at: attention transfer (Zagoruyko & Komodakis 2017): CE + beta/2 * the attention losses summed
    over the group ends; attention map = mean over channels of |A|^p."""

    beta: float = 1000.0
    p: float = 2.0

    def __post_init__(self):
        _check("at.beta", self.beta, self.beta >= 0 and math.isfinite(self.beta), ">= 0")
        _check("at.p", self.p, self.p > 0 and math.isfinite(self.p), "> 0")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 128  # global batch
    epochs: float = 200.0
    steps: int | None = None  # overrides epochs when set
    log_every_steps: int = 50
    eval_every_steps: int | None = None  # None = once per epoch
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 10.0  # also by time, so a crash costs at most this much (0: off)
    skip_nonfinite_steps: int = 0  # non-finite loss/gradients: skip up to this many updates in a row (0: stop)
    seed: int = 0
    freeze_batch_norm: bool = False  # RAFT's freeze_bn: the trained network's BatchNorm keeps its running stats
    # Activations (child, frozen parent, Transfer adapters, GA inputs) in this dtype; parameters, optimizer
    # state, BatchNorm statistics, losses and metrics stay float32, and so do exports. A run setting, not
    # part of the model spec: checkpoints load in either dtype.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self):
        _check("train.batch_size", self.batch_size, self.batch_size > 0, "a positive integer")
        _check("train.epochs", self.epochs, self.epochs > 0 and math.isfinite(self.epochs), "> 0")
        _check("train.steps", self.steps, self.steps is None or self.steps > 0, "a positive integer or none")
        _check("train.log_every_steps", self.log_every_steps, self.log_every_steps > 0, "a positive integer")
        _check(
            "train.eval_every_steps",
            self.eval_every_steps,
            self.eval_every_steps is None or self.eval_every_steps > 0,
            "a positive integer or none",
        )
        _check(
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            self.checkpoint_every_steps > 0,
            "a positive integer",
        )
        _check(
            "train.checkpoint_every_minutes",
            self.checkpoint_every_minutes,
            self.checkpoint_every_minutes >= 0 and math.isfinite(self.checkpoint_every_minutes),
            ">= 0 (0: off)",
        )
        _check("train.skip_nonfinite_steps", self.skip_nonfinite_steps, self.skip_nonfinite_steps >= 0, ">= 0")
        _check(
            "train.compute_dtype", self.compute_dtype, self.compute_dtype in COMPUTE_DTYPES, f"one of {COMPUTE_DTYPES}"
        )


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int = -1  # -1 = all devices not used by `model`
    model: int = 1  # > 1 shards the frozen parent's parameters
    shard_trainable: bool = False  # shard child params + optimizer state instead of replicating them

    def __post_init__(self):
        _check("mesh.data", self.data, self.data == -1 or self.data >= 1, "-1 (all devices) or a positive integer")
        _check("mesh.model", self.model, self.model >= 1, "a positive integer")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    task: str = DEFAULT_TASK  # a name in hkt_jax.tasks.TASKS
    method: str = "hkt"  # hkt_jax.training.methods.METHODS
    child: ModelConfig = ModelConfig(depth=20)
    parent: ModelConfig = ModelConfig(depth=110)
    parent_ckpt: str | None = None  # model checkpoint dir; None = train the parent first (--parent_ckpt sets it)
    parent_epochs: float | None = None  # epochs a parent trains, planned or method=parent (None = train.epochs)
    init_ckpt: str | None = None  # exported network (export/child, best/) the trained network starts from
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    hkt: HKTSettings = HKTSettings()
    kd: KDSettings = KDSettings()
    fitnet: FitNetSettings = FitNetSettings()
    at: ATSettings = ATSettings()
    train: TrainSettings = TrainSettings()
    mesh: MeshSettings = MeshSettings()
    # The task's own settings (an instance of its ``Task.settings_type``; None = its defaults, or none for a
    # task without settings). Command line and config.json name them by ``Task.settings_name()`` (``seg``).
    task_settings: Any = dataclasses.field(default=None, metadata={"nested": True})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {METHODS}")
        task = task_class(self.task)
        expected = task.settings_type
        if expected is None and self.task_settings is not None:
            raise ValueError(
                f"task_settings={type(self.task_settings).__name__}(...): task={self.task!r} has no "
                "settings; leave task_settings out (or set it to None)"
            )
        if expected is not None:
            if self.task_settings is None:
                object.__setattr__(self, "task_settings", expected())
            elif not isinstance(self.task_settings, expected):
                raise ValueError(
                    f"task_settings: task={self.task!r} takes {expected.__name__}(...), got "
                    f"{type(self.task_settings).__name__}"
                )
            if task.settings_name() in {field.name for field in dataclasses.fields(self)}:
                raise ValueError(
                    f"task={self.task!r}: its settings key {task.settings_name()!r} is already a "
                    "config field; give the task another settings_key"
                )
        _check("parent_epochs", self.parent_epochs, self.parent_epochs is None or self.parent_epochs > 0, "> 0 or none")

    @property
    def cli_names(self) -> dict[str, str]:
        """Fields the command line and ``config.json`` call by another name (the task's settings)."""
        return {"task_settings": task_class(self.task).settings_name()} if self.task_settings is not None else {}

    def record(self) -> dict[str, Any]:
        """What ``config.json`` holds: every setting, models with only the fields their architecture uses, the
        task's settings (if it has any) under its key."""
        record = dataclasses.asdict(self)
        record["child"], record["parent"] = self.child.record(), self.parent.record()
        record["hkt"].pop("boundaries", None)
        settings = record.pop("task_settings")
        if settings is not None:
            record[self.cli_names["task_settings"]] = settings
        return record


def load_config(name: str) -> ExperimentConfig:
    """``get_config()`` of ``experiments/configs/<name>.py``."""
    try:
        module = importlib.import_module(f"experiments.configs.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"experiments.configs.{name}":
            raise
        raise ValueError(f"unknown config {name!r}: no experiments/configs/{name}.py") from None
    return module.get_config()


def _cli_name(config: Any, field_name: str) -> str:
    return getattr(config, "cli_names", {}).get(field_name, field_name)


def _field_paths(config: Any, prefix: str = "") -> list[str]:
    paths = []
    for field in dataclasses.fields(config):
        if not field.metadata.get("cli", True):
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            paths += _field_paths(value, f"{prefix}{_cli_name(config, field.name)}.")
        elif not field.metadata.get("nested", False):
            paths.append(prefix + field.name)
    return paths


def _parse_value(text: str, annotation: Any, current: Any, path: str) -> Any:
    """Parse ``text`` as the type the field is annotated with (falls back to the current value's type)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _parse_value(text, non_none[0], current, path)
    if origin is Literal:
        if text not in args:
            raise ValueError(f"override {path}={text!r}: expected one of {args}")
        return text
    if origin is tuple:
        item_type = args[0] if args else str
        items = [t for t in text.strip("()[] ").split(",") if t.strip()]
        return tuple(_parse_value(t.strip(), item_type, None, path) for t in items)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {path}={text!r}: expected true/false")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"override {path}={text!r}: expected {annotation.__name__}") from None
    return type(current)(text) if current is not None else text


def _replace_all(config: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """One ``dataclasses.replace`` per nested config, so fields that are only
    valid together (``data.source`` + ``data.path``) are checked together."""
    hints = typing.get_type_hints(type(config))
    fields = {_cli_name(config, field.name): field.name for field in dataclasses.fields(config)}
    changes = {}
    for name, update in updates.items():
        path, field = prefix + name, fields[name]
        if isinstance(update, dict):
            changes[field] = _replace_all(getattr(config, field), update, path + ".")
        else:
            changes[field] = _parse_value(update, hints[field], getattr(config, field), path)
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as error:  # name the user's keys when the check that failed does not (e.g. the engine's)
        given = {prefix + name: update for name, update in updates.items() if not isinstance(update, dict)}
        if given and not any(key in str(error) for key in given):
            raise ValueError(f"{' '.join(f'{k}={v}' for k, v in given.items())}: {error}") from None
        raise


def _switch_task(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``config`` for the task a ``task=NAME`` override names (the last one), so that the new task's settings
    keys are valid overrides too; settings of another type are replaced by the new task's defaults."""
    names = [item.lstrip("-").partition("=")[2] for item in overrides if item.lstrip("-").partition("=")[0] == "task"]
    if not names or names[-1] == config.task:
        return config
    settings_type = task_class(names[-1]).settings_type
    keep = settings_type is not None and isinstance(config.task_settings, settings_type)
    return dataclasses.replace(config, task=names[-1], task_settings=config.task_settings if keep else None)


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """Apply ``a.b=value`` overrides (also accepts ``--a.b=value``); later ones win."""
    config = _switch_task(config, overrides)
    valid = _field_paths(config)
    updates: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        prefix = key.partition(".")[0]
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        if key not in valid:
            owners = [name for name, task in TASKS.items() if task.settings_type and task.settings_name() == prefix]
            hint = f" ({prefix}.* belongs to task={owners[0]}, this config is task={config.task})" if owners else ""
            raise ValueError(f"override {item!r}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")
        *parents, leaf = key.split(".")
        node = updates
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = text
    return _replace_all(config, updates) if updates else config
