"""method=fitnet and method=at: their losses against float64 NumPy formulas, clear errors, a smoke run each."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import smoke
from hkt_jax.training import checkpoint, factories
from hkt_jax.training.config import ATSettings, FitNetSettings, apply_overrides
from hkt_jax.training.methods import REGRESSOR_KEY, attention_map, attention_transfer_loss, hint_loss
from hkt_jax.models import CifarResNet, ToyStagedNet, apply_stage, build_model, model_spec
from hkt_jax.tasks import Classification
from hkt_jax.tasks.segmentation import Segmentation
from hkt_jax.training.train import train_and_evaluate
from tests import np_reference

CHILD = CifarResNet(depth=8, num_classes=10, stage_split="groups", conv_impl="xla")
PARENT = CifarResNet(depth=8, num_classes=10, stage_split="groups", conv_impl="xla")  # another init


def _np_attention(a, p):
    """Zagoruyko & Komodakis' at(x) = F.normalize(x.pow(p).mean(1).view(B, -1)), float64, NHWC."""
    q = (np.abs(a) ** p).mean(-1).reshape(a.shape[0], -1)
    return q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def test_attention_and_hint_losses_match_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 4, 5, 6)), rng.normal(size=(3, 4, 5, 9))  # widths may differ
    for p in (2.0, 1.0, 3.0):
        expected = ((_np_attention(student, p) - _np_attention(teacher, p)) ** 2).mean()
        got = attention_transfer_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), p)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(attention_map(jnp.asarray(student, jnp.float32))), axis=-1), 1.0, rtol=1e-6
    )
    assert float(attention_transfer_loss(jnp.ones((2, 3, 3, 4)), 5 * jnp.ones((2, 3, 3, 8)))) == 0.0  # scale-free
    np.testing.assert_allclose(
        float(hint_loss(jnp.asarray(student, jnp.float32), jnp.asarray(student[..., ::-1] + 1, jnp.float32))),
        ((student - student[..., ::-1] - 1) ** 2).mean(),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="equal batch and spatial sizes"):
        attention_transfer_loss(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 3)))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(1)
    batch = {
        "image": jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 2), jnp.int32),
    }
    return batch, jax.jit(PARENT.init)(jax.random.key(7), batch["image"])


def _stage_outputs(model, variables, x, train):
    outputs = []
    for index in range(4):
        if train:
            x = model.apply(variables, index, x, train=True, method="stage", mutable=["batch_stats"])[0]
        else:
            x = apply_stage(model, variables, index, x, train=False)[0]
        outputs.append(np.asarray(x, np.float64))
    return outputs


@pytest.mark.parametrize("method", ["at", "fitnet"])
def test_method_loss_matches_numpy_on_the_group_ends(pair, method):
    batch, parent_variables = pair
    loss_fn, init = factories.make_method(
        method,
        CHILD,
        Classification(),
        batch["image"],
        jax.random.key(0),
        parent=PARENT,
        parent_variables=parent_variables,
        fitnet=FitNetSettings(weight=100.0, stage="group2"),
        at=ATSettings(beta=1000.0, p=2.0),
    )
    loss, aux = jax.jit(loss_fn)(init["params"], init["batch_stats"], parent_variables, batch)

    child_vars = {"params": init["params"]["child"], "batch_stats": init["batch_stats"]["child"]}
    s = _stage_outputs(CHILD, child_vars, batch["image"], train=True)
    t = _stage_outputs(PARENT, parent_variables, batch["image"], train=False)
    assert [x.shape[1:] for x in s[:3]] == [(32, 32, 16), (16, 16, 32), (8, 8, 64)]
    ce = np_reference.cross_entropy(s[-1], np.asarray(batch["label"]))
    if method == "at":
        terms = [((_np_attention(a, 2.0) - _np_attention(b, 2.0)) ** 2).mean() for a, b in zip(s[:3], t[:3])]
        expected, feature_term = ce + 1000.0 / 2 * sum(terms), sum(terms)
        for name, term in zip(("group1", "group2", "group3"), terms):
            np.testing.assert_allclose(float(aux["metrics"][f"at/{name}"]), term, rtol=1e-4)
        assert "adapters" not in init["params"]
    else:
        regressor = init["params"]["adapters"][REGRESSOR_KEY]["conv"]
        kernel, bias = (np.asarray(regressor[k], np.float64) for k in ("kernel", "bias"))
        assert kernel.shape == (1, 1, 32, 32)  # child width -> parent width at the middle group
        regressed = s[1] @ kernel[0, 0] + bias
        feature_term = ((regressed - t[1]) ** 2).mean()
        expected = ce + 100.0 * feature_term
    np.testing.assert_allclose(float(aux["metrics"]["l2"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(aux["metrics"]["l3"]), feature_term, rtol=1e-4)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert feature_term > 0

    # The parent gets exactly zero gradient; the feature term alone reaches the child.
    parent_grad = jax.jit(jax.grad(lambda pv: loss_fn(init["params"], init["batch_stats"], pv, batch)[0]))(
        parent_variables
    )
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(parent_grad))
    term_grad = jax.jit(
        jax.grad(lambda q: loss_fn(q, init["batch_stats"], parent_variables, batch)[1]["metrics"]["l3"])
    )(init["params"])
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(term_grad["child"]))


def test_clear_errors(pair):
    batch, parent_variables = pair
    batch = {"image": batch["image"][:1, :8, :8]}  # the checks read shapes only: any size will do
    paper_child = CifarResNet(depth=8, conv_impl="xla")  # the paper split: a pooled 64-d vector, no maps
    paper_parent = CifarResNet(depth=8, conv_impl="xla")
    with pytest.raises(ValueError, match="needs \\(B, H, W, C\\) feature maps .* stage_split='groups'"):
        factories.make_method(
            "at",
            paper_child,
            Classification(),
            batch["image"],
            jax.random.key(0),
            parent=paper_parent,
            parent_variables=parent_variables,
        )
    with pytest.raises(ValueError, match="feature_distillation only .task=classification"):
        factories.make_method(
            "fitnet",
            CHILD,
            Segmentation(),
            batch["image"],
            jax.random.key(0),
            parent=PARENT,
            parent_variables=parent_variables,
        )
    with pytest.raises(ValueError, match="fitnet.stage='head'.*group1"):
        factories.make_method(
            "fitnet",
            CHILD,
            Classification(),
            batch["image"],
            jax.random.key(0),
            parent=PARENT,
            parent_variables=parent_variables,
            fitnet=FitNetSettings(stage="head"),
        )
    toy = ToyStagedNet(widths=(4, 8), num_classes=10)
    with pytest.raises(ValueError, match="share stage names"):
        factories.make_method(
            "at",
            toy,
            Classification(),
            batch["image"],
            jax.random.key(0),
            parent=PARENT,
            parent_variables=parent_variables,
        )
    strided = ToyStagedNet(widths=(4, 8), strides=(2, 1), num_classes=10)
    toy_parent_vars = toy.init(jax.random.key(1), batch["image"])
    with pytest.raises(ValueError, match="at stage 'stem' the child's maps are \\(4, 4\\)"):
        factories.make_method(
            "at",
            strided,
            Classification(),
            batch["image"],
            jax.random.key(0),
            parent=toy,
            parent_variables=toy_parent_vars,
        )
    with pytest.raises(ValueError, match="needs a parent"):
        factories.make_method("fitnet", CHILD, Classification(), batch["image"], jax.random.key(0))
    with pytest.raises(ValueError, match="at.beta"):
        apply_overrides(smoke.get_config(), ["at.beta=-1"])
    with pytest.raises(ValueError, match="fitnet.weight"):
        apply_overrides(smoke.get_config(), ["fitnet.weight=-1"])


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("parent")
    spec = model_spec("cifar_resnet", depth=8, num_classes=10)
    checkpoint.save_model(directory, build_model(spec).init(jax.random.key(42), jnp.zeros((1, 32, 32, 3))), spec)
    return directory


@pytest.mark.parametrize("method", ["fitnet", "at"])
def test_smoke_run(tmp_path, parent_dir, method, capsys):
    overrides = [
        f"method={method}",
        f"parent_ckpt={parent_dir}",
        "child.conv_impl=xla",
        "parent.conv_impl=xla",
        "train.steps=4",
        "train.log_every_steps=2",
        "train.eval_every_steps=4",
        "train.checkpoint_every_steps=4",
        "data.synthetic_train_size=64",
        "data.validation_size=16",
        "data.synthetic_test_size=16",
        "train.batch_size=16",
    ]
    summary = train_and_evaluate(apply_overrides(smoke.get_config(), overrides), tmp_path)
    assert summary["method"] == method and summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "l3" in r]
    assert len(train_rows) == 2 and all(np.isfinite(r["loss"]) and r["l3"] > 0 for r in train_rows)
    variables, spec = checkpoint.load_model(tmp_path / "export" / "child")  # the child alone, no regressor
    assert spec["kwargs"]["depth"] == 8 and "adapters" not in variables["params"]
    assert "stage_split" not in spec["kwargs"]
    if method == "fitnet":
        assert "FitNet regressor parameters" in capsys.readouterr().out
