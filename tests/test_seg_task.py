"""Segmentation through the one training core: the seg_smoke job (parent then HKT child), exact resume,
whole-volume inference with ``segment_volume``, and the Task's Dice sums against NumPy formulas."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hkt_jax.training import checkpoint
from hkt_jax.training.config import apply_overrides, load_config
from hkt_jax.training.experiment import run
from hkt_jax.models import PocketNet, UNet
from hkt_jax.tasks import make_task
from hkt_jax.tasks.segmentation import Segmentation
from tests import np_reference, tb_events


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("seg_cache")


def _config(cache_dir, *overrides):
    return apply_overrides(load_config("seg_smoke"), [f"data.cache_dir={cache_dir}", *overrides])


def _rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    """The bare ``seg_hkt --config smoke`` job: parent U-Net trained first, then the PocketNet child by HKT."""
    workdir = tmp_path_factory.mktemp("seg_smoke")
    return workdir, run(_config(cache_dir), workdir)


def test_smoke_trains_parent_then_hkt_child(smoke_run):
    workdir, summary = smoke_run
    parent = json.loads((workdir / "parent" / "summary.json").read_text())
    assert parent["task"] == "segmentation" and parent["method"] == "parent"
    assert parent["final_test_dice"] > 0.3  # liver Dice per case: the parent has learnt the organ
    train_rows = [r for r in _rows(workdir) if "loss" in r]
    assert {"l1", "l2", "l3", "pixel_accuracy", "dice", "ga_ratio/to_child_0_x", "ga_ratio/to_parent_1_x"} <= set(
        train_rows[-1]
    )
    assert train_rows[-1]["l2"] < train_rows[0]["l2"]  # the child learns
    eval_rows = [r for r in _rows(workdir) if "eval_dice" in r]
    assert [r["step"] for r in eval_rows] == [40, 80]
    assert {"eval_dice_per_case/liver", "eval_dice_global/tumour", "eval_pixel_accuracy"} <= set(eval_rows[-1])
    best = max(eval_rows, key=lambda r: r["eval_dice"])
    assert summary["best_validation_dice"] == pytest.approx(best["eval_dice"])
    assert summary["final_test"]["dice"] == summary["final_test"]["dice_per_case/liver"]
    _, spec = checkpoint.load_model(workdir / "export" / "child")  # the child alone
    assert spec["arch"] == "pocketnet" and spec["kwargs"]["width"] == 8 and spec["kwargs"]["num_classes"] == 3
    assert json.loads((workdir / "config.json").read_text())["seg"]["synthetic_cases"] == 4
    shown = tb_events.images(workdir)["image_truth_prediction"]  # TensorBoard: image | truth | prediction
    assert sorted(shown) == [40, 80] and shown[80].shape == (4 * 32, 3 * 32, 3)
    assert len(np.unique(shown[80].reshape(-1, 3), axis=0)) > 10  # an image, not a blank


def test_resume_continues_exactly(tmp_path, smoke_run, cache_dir):
    """Stopping after 2 steps and rerunning to 4 ends where 4 straight steps end (constant schedule)."""
    parent = str(smoke_run[0] / "parent" / "export" / "child")
    common = (f"parent_ckpt={parent}", "train.eval_every_steps=2", "train.checkpoint_every_steps=2")
    straight = run(_config(cache_dir, *common, "train.steps=4"), tmp_path / "straight")
    run(_config(cache_dir, *common, "train.steps=2"), tmp_path / "resumed")
    resumed = run(_config(cache_dir, *common, "train.steps=4"), tmp_path / "resumed")
    assert straight["final_test"] == resumed["final_test"]
    a, _ = checkpoint.load_model(tmp_path / "straight" / "export" / "child")
    b, _ = checkpoint.load_model(tmp_path / "resumed" / "export" / "child")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_segment_volume_writes_input_geometry_and_prints_dice(tmp_path, smoke_run, capsys):
    import nibabel as nib

    from experiments import segment_volume
    from hkt_jax.data.synthetic_ct import SyntheticCTConfig, write_synthetic_lits

    # 36x28 slices: not a multiple of the network's 4x down-sampling, so padding is exercised.
    (volume,) = write_synthetic_lits(tmp_path / "case", 1, seed=99, config=SyntheticCTConfig(shape=(36, 28, 7)))
    gt = tmp_path / "case" / "segmentation-0.nii.gz"
    out = tmp_path / "pred" / "pred.nii.gz"
    model = smoke_run[0] / "parent" / "export" / "child"
    code = segment_volume.main(
        ["--model", str(model), str(volume), "--out", str(out), "--gt", str(gt), "--batch_size", "3"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    source, written = nib.load(str(volume)), nib.load(str(out))
    assert written.shape == source.shape == (36, 28, 7)
    np.testing.assert_array_equal(written.affine, source.affine)
    predicted, truth = np.asarray(written.dataobj), np.asarray(nib.load(str(gt)).dataobj)
    assert predicted.dtype == np.uint8 and set(np.unique(predicted)) <= {0, 1, 2}
    liver_p, liver_t = predicted > 0, truth > 0
    liver = 2.0 * np.sum(liver_p & liver_t) / (liver_p.sum() + liver_t.sum())
    assert f"liver: {liver:.4f}" in printed
    labelled = [k for k in range(7) if (predicted[:, :, k] > 0).any() or (truth[:, :, k] > 0).any()]
    drawn = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "pred" / "pred_slices").glob("*.png"))
    assert len(drawn) == min(4, len(labelled)) and set(drawn) <= set(labelled)

    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(truth[:, :, :-1], source.affine), str(wrong))
    assert segment_volume.main(["--model", str(model), str(volume), "--out", str(out), "--gt", str(wrong)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "wrong.nii.gz: shape" in error and error.count("\n") == 1


# -- the Task alone ---------------------------------------------------------------------------------


def _dice(pred, true):
    denominator = pred.sum() + true.sum()
    return 1.0 if denominator == 0 else 2.0 * np.sum(pred & true) / denominator


def test_eval_sums_give_lits_dice_per_case_and_global():
    """Sums over two eval batches, finished, vs float64 NumPy on the real slices of each case."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 6, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(8, 6, 5)).astype(np.int32)
    case = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    logits[case == 2, :, :, 2] = -9.0  # case 2: no tumour predicted ...
    labels[case == 2] = np.minimum(labels[case == 2], 1)  # ... nor present: tumour Dice 1 by convention
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)  # the last slice is padding
    task = Segmentation()
    eval_sums = jax.jit(task.eval_sums)
    totals = None
    for part in (slice(0, 4), slice(4, 8)):
        batch = {"mask": labels[part], "valid": valid[part], "case": np.eye(3, dtype=np.int32)[case[part]]}
        sums = jax.device_get(eval_sums(logits[part], batch))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    result = task.finish_eval({k: float(v) for k, v in totals.items()})

    real = valid > 0
    predicted = np.argmax(logits, -1)
    expected = {}
    for name, region in (("liver", (1, 2)), ("tumour", (2,))):
        p, t = np.isin(predicted, region), np.isin(labels, region)
        per_case = [_dice(p[real & (case == k)], t[real & (case == k)]) for k in range(3)]
        expected[f"dice_per_case/{name}"] = np.mean(per_case)
        expected[f"dice_global/{name}"] = _dice(p[real], t[real])
        if name == "tumour":
            assert per_case[2] == 1.0
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["dice"] == result["dice_per_case/liver"]
    assert result["pixel_accuracy"] == pytest.approx(np.mean(predicted[real] == labels[real]))
    assert result["loss"] == pytest.approx(np_reference.cross_entropy(logits[real], labels[real]), rel=1e-5)


def test_settings_reach_the_task_and_losses():
    config = apply_overrides(load_config("seg_smoke"), ["seg.ce_weight=0", "seg.num_classes=2"])
    task = make_task("segmentation", config)
    assert task.settings == config.task_settings and task.settings.regions == (("foreground", (1,)),)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
    batch = {"mask": rng.integers(0, 2, size=(2, 4, 4))}
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    target = batch["mask"] == 1
    soft_dice = (2 * np.sum(probs[..., 1] * target) + 1e-5) / (probs[..., 1].sum() + target.sum() + 1e-5)
    assert float(task.task_loss(logits, batch)) == pytest.approx(1 - soft_dice, rel=1e-5)  # Dice only
    with pytest.raises(ValueError, match="inherit_loss='seq'"):
        task.inherit_loss("seq")


def test_unet_pair_wiring_comes_from_the_model():
    child, parent = PocketNet(width=8, depth=2), UNet(widths=(8, 16))
    three = child.hkt_boundaries()
    assert three == parent.hkt_boundaries(3) and len(three) == 2
    assert [link.receiver for link in three[0].to_child] == ["x"]
    with_skips = child.hkt_boundaries(skips=(1,))
    assert [link.receiver for link in with_skips[1].to_parent] == ["x", "skips/1"]
    two = child.hkt_boundaries(2)
    assert not two[0].backbone and not two[0].head and two[1].to_child == three[1].to_child
    with pytest.raises(ValueError, match="hkt.stages=4"):
        child.hkt_boundaries(4)
