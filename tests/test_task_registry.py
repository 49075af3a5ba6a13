"""Tasks register themselves in one line and own their settings; the trainer never names a task.

A user's task (``Brightness`` below: is an image brighter than a threshold?) with its own settings
trains through the unchanged ``train_and_evaluate``; workdirs written before tasks owned their settings
(every config.json with a ``seg`` block) still resume.
"""

from __future__ import annotations

import ast
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hkt_jax.data import DataConfig
from hkt_jax.data.arrays import ArrayDatasets
from hkt_jax.tasks import TASKS, Classification, Flow, Task, make_task, register_task
from hkt_jax.tasks.segmentation import SegSettings
from hkt_jax.training import preflight
from hkt_jax.training.config import ExperimentConfig, ModelConfig, TrainSettings, apply_overrides, load_config
from hkt_jax.training.faults import UserError
from hkt_jax.training.train import train_and_evaluate
from tests.conftest import REPO_ROOT

TASK_NAMES = ("classification", "segmentation", "flow", "toy_segmentation")


@dataclasses.dataclass(frozen=True)
class BrightnessSettings:
    threshold: float = 0.0
    image_size: int = 8


def _ce(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()


@register_task
@dataclasses.dataclass(frozen=True)
class Brightness(Task):
    """Label 1 where an image's mean is above ``settings.threshold``."""

    name: str = "test_brightness"
    selection_metric: str = "accuracy"
    selection_mode: str = "max"
    settings_type = BrightnessSettings
    settings_key = "bright"
    settings: BrightnessSettings = BrightnessSettings()

    def _split(self, size, seed):
        images = (
            np.random.default_rng(seed)
            .normal(0.0, 1.0, (size, self.settings.image_size, self.settings.image_size, 3))
            .astype(np.float32)
        )
        return {"image": images, "label": (images.mean(axis=(1, 2, 3)) > self.settings.threshold).astype(np.int32)}

    def make_datasets(self, data_config, *, global_batch_size, seed, process_index=None, process_count=None):
        splits = {
            "train": self._split(data_config.synthetic_train_size, 0),
            "validation": self._split(data_config.validation_size, 1),
            "test": self._split(data_config.synthetic_test_size, 2),
        }
        return ArrayDatasets(
            splits,
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def model_kwargs(self, datasets):
        return {"num_classes": 2}

    def example_input(self, datasets, batch_size=2):
        return jnp.zeros((batch_size, self.settings.image_size, self.settings.image_size, 3), jnp.float32)

    def task_loss(self, outputs, batch):
        return _ce(outputs, batch)

    def inherit_loss_table(self):
        return {"ce": _ce}

    def eval_sums(self, outputs, batch):
        correct = (jnp.argmax(outputs, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * batch["mask"]), "count": jnp.sum(batch["mask"])}

    def finish_eval(self, sums):
        return {"accuracy": float(sums["correct"]) / float(sums["count"])}


TINY = dict(
    method="child",
    child=ModelConfig(arch="toy", widths=(4, 4)),
    parent=ModelConfig(arch="toy", widths=(4, 4)),
    data=DataConfig(source="synthetic", validation_size=8, synthetic_train_size=16, synthetic_test_size=8),
    train=TrainSettings(batch_size=8, steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2),
)


def _old_record(config: ExperimentConfig) -> dict:
    """config.json as the code before task-owned settings wrote it: a ``seg`` block in every run."""
    record = preflight.normalized_record(config)
    record.setdefault("seg", json.loads(json.dumps(dataclasses.asdict(SegSettings()))))
    return record


def test_a_users_task_registered_in_one_line_trains_and_resumes(tmp_path, capsys):
    """2 steps of a task defined and registered above, set from the command line (``bright.*``); then the
    workdir's config.json is rewritten as the code before task-owned settings wrote it (a ``seg`` block)
    and the run resumes to step 3 all the same."""
    assert TASKS["test_brightness"] is Brightness
    config = apply_overrides(ExperimentConfig(task="test_brightness", **TINY), ["bright.threshold=0.05"])
    assert config.task_settings == BrightnessSettings(threshold=0.05)
    assert make_task(config).settings.threshold == 0.05
    summary = train_and_evaluate(config, tmp_path)
    assert summary["steps"] == 2 and 0.0 <= summary["final_test_accuracy"] <= 1.0
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["task"] == "test_brightness" and record["bright"] == {"threshold": 0.05, "image_size": 8}
    assert "seg" not in record and "task_settings" not in record

    (tmp_path / "config.json").write_text(json.dumps(_old_record(config), indent=2))
    assert train_and_evaluate(apply_overrides(config, ["train.steps=3"]), tmp_path)["steps"] == 3
    out = capsys.readouterr().out
    assert "resuming from step 2 of 3" in out and "seg." not in out
    assert "seg" not in json.loads((tmp_path / "config.json").read_text())


def test_unknown_task_names_the_registered_ones():
    for make in (lambda: ExperimentConfig(task="segmentaton"), lambda: make_task("segmentaton")):
        with pytest.raises(
            ValueError,
            match="task='segmentaton': expected one of .*'classification'.*'segmentation'"
            ".*'test_brightness'.*register_task",
        ):
            make()


def test_a_name_registers_once_and_the_registry_is_read_only():
    @dataclasses.dataclass(frozen=True)
    class Impostor(Classification):
        pass

    with pytest.raises(ValueError, match="task name 'classification' is taken by .*Classification.*another name"):
        register_task(Impostor)
    assert TASKS["classification"] is Classification
    assert register_task(Classification) is Classification  # the same class again is no duplicate
    with pytest.raises(TypeError):
        TASKS["classification"] = Impostor  # type: ignore[index]

    class Nameless(Brightness):
        name = Task.name

    with pytest.raises(ValueError, match="its own name"):
        register_task(Nameless)


def test_settings_belong_to_their_task():
    with pytest.raises(ValueError, match="task='classification' has no settings"):
        ExperimentConfig(task_settings=SegSettings())
    with pytest.raises(ValueError, match="task='segmentation' takes SegSettings"):
        ExperimentConfig(task="segmentation", task_settings=BrightnessSettings())
    with pytest.raises(ValueError, match=r"unknown key 'seg.window' \(seg.\* belongs to task=segmentation"):
        apply_overrides(load_config("smoke"), ["seg.window=0,1"])
    switched = apply_overrides(load_config("smoke"), ["task=segmentation", "seg.slice_size=16"])
    assert switched.task_settings == SegSettings(slice_size=16)
    assert apply_overrides(switched, ["task=classification"]).task_settings is None
    assert "seg" not in load_config("flow_smoke").record() and "seg" not in load_config("smoke").record()
    assert load_config("seg_smoke").record()["seg"]["synthetic_cases"] == 4


@pytest.mark.parametrize("name", ["cifar_cpu", "smoke", "flow_smoke"])
def test_a_workdir_written_with_a_seg_block_resumes(tmp_path, name):
    """What decides whether a workdir resumes: the config.json of a CIFAR or flow run started before tasks
    owned their settings (with the then-universal ``seg`` block) matches today's config of the same run."""
    config = load_config(name)
    (tmp_path / "summary.json").write_text("{}")  # a finished run: its config.json is checked
    (tmp_path / "config.json").write_text(json.dumps(_old_record(config)))
    assert "seg" not in config.record()
    assert preflight.check_config_change(apply_overrides(config, ["train.steps=7"]), tmp_path) == {
        "train.steps": (config.train.steps, 7)
    }
    with pytest.raises(UserError, match="optim.learning_rate"):
        preflight.check_config_change(apply_overrides(config, ["optim.learning_rate=0.123"]), tmp_path)


def test_a_segmentation_workdir_of_before_resumes_and_its_settings_are_still_compared(tmp_path):
    config = load_config("seg_smoke")
    (tmp_path / "summary.json").write_text("{}")  # a finished run: its config.json is checked
    (tmp_path / "config.json").write_text(json.dumps(_old_record(config)))
    assert _old_record(config)["seg"]["synthetic_cases"] == 4  # the run's own settings, as written then
    assert preflight.check_config_change(apply_overrides(config, ["train.steps=50"]), tmp_path) == {
        "train.steps": (None, 50)
    }
    with pytest.raises(UserError, match=r"seg.window: \[-200.0, 250.0\] -> \[-100.0, 250.0\]"):
        preflight.check_config_change(apply_overrides(config, ["seg.window=-100,250"]), tmp_path)


def _names_a_task(node: ast.AST) -> str | None:
    """A task's name as a string (``"flow"``, ``"task=flow"``, ``"'flow'"`` inside a message) or ``.seg``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
        return next(
            (
                name
                for name in TASK_NAMES
                if text == name or f"task={name}" in text or f"'{name}'" in text or f'"{name}"' in text
            ),
            None,
        )
    if isinstance(node, ast.Attribute) and node.attr == "seg":
        return ".seg"
    return None


def _docstrings(tree: ast.AST) -> set[int]:
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def test_the_trainer_names_no_task():
    """Everything task-specific is the task's: no hkt_jax/training module spells a task's name in code (prose in
    docstrings aside) or reads ``.seg``."""
    paths = sorted((REPO_ROOT / "hkt_jax" / "training").glob("*.py"))
    assert len(paths) > 10
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if id(node) not in docstrings and (name := _names_a_task(node)):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {name}")
    assert not found, found
    for code, named in (
        ('x = "flow"', "flow"),
        ('x = f"needs task=segmentation, not {y}"', "segmentation"),
        ("x = config.seg.window", ".seg"),
        ('x = "a flow of data"', None),
    ):
        assert next(filter(None, map(_names_a_task, ast.walk(ast.parse(code)))), None) == named, code


def test_flow_honours_its_max_flow_everywhere():
    """A pixel over the task's max_flow is ignored by the task loss, the paper's MAE (L1/L3) and the logged
    EPE, whatever the module default is."""
    flow = np.zeros((1, 2, 2, 2), np.float32)
    flow[0, 0, 0] = (30.0, 0.0)
    batch = {"flow": jnp.asarray(flow), "valid": jnp.ones((1, 2, 2))}
    outputs = jnp.zeros((1, 1, 2, 2, 2))
    capped, default = Flow(max_flow=10.0), Flow()
    assert float(capped.task_loss(outputs, batch)) == 0.0 < float(default.task_loss(outputs, batch))
    assert float(capped.inherit_loss("mae")(outputs, batch)) == 0.0 < float(default.inherit_loss("mae")(outputs, batch))
    assert (
        float(capped.train_metrics(outputs, batch)["epe"]) == 0.0 < float(default.train_metrics(outputs, batch)["epe"])
    )
    with pytest.raises(ValueError, match=r"hkt.inherit_loss='ce': task 'flow' takes one of \('seq', 'mae'\)"):
        capped.inherit_loss("ce")
