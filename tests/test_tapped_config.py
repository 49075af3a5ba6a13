"""Taps from the command line: `hkt.child_taps` / `hkt.parent_taps` cut registered models at submodule
paths (hkt_jax.models.Tapped) through the ordinary training run."""

from __future__ import annotations

import json

import pytest

from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run

TINY = [
    "child.depth=8",
    "parent.depth=8",
    "data.synthetic_train_size=128",
    "data.synthetic_test_size=32",
    "data.validation_size=32",
    "train.batch_size=16",
    "train.steps=4",
    "train.log_every_steps=2",
    "train.eval_every_steps=4",
    "train.checkpoint_every_steps=4",
    "parent_epochs=1",
    "child.conv_impl=xla",
    "parent.conv_impl=xla",
    "hkt.mode=softmax",
]


def test_taps_on_both_sides_train_through_the_usual_run(tmp_path):
    config = apply_overrides(
        load_config("smoke"), [*TINY, "hkt.child_taps=layer1_0,layer2_0", "hkt.parent_taps=layer1_0,layer2_0"]
    )
    summary = run(config, tmp_path)
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "l1" in r]
    # Two tapped boundaries, softmax GA after each (the spatial group outputs), both directions.
    ga_keys = {k for k in train[-1] if k.startswith("ga_ratio/")}
    for boundary in ("to_child_0", "to_child_1", "to_parent_0", "to_parent_1"):
        assert any(k.startswith(f"ga_ratio/{boundary}") for k in ga_keys), (boundary, ga_keys)
    assert all(r["l1"] > 0 and r["l3"] > 0 for r in train)
    spec = json.loads((tmp_path / "export" / "child" / "model.json").read_text())
    assert spec["arch"] == "cifar_resnet"  # the export is the plain model, not the wrapper


def test_unknown_tap_path_lists_the_available_ones(tmp_path):
    config = apply_overrides(load_config("smoke"), [*TINY, "hkt.child_taps=layer9_0", "hkt.parent_taps=layer1_0"])
    with pytest.raises(ValueError, match="layer9_0.*layer1_0"):
        run(config, tmp_path)
