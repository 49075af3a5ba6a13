"""The seeds x variants comparison: aggregation, seed bookkeeping, resuming a half-finished grid,
failed runs reported (never averaged)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from experiments import compare
from hkt_jax.grids import comparison
from hkt_jax.grids.comparison import Grid

GRID = Grid(
    experiment="tests.fake_experiment",
    config="unused",
    seeds=(0, 1, 2),
    variants={"base": (), "better": ("bonus=0.1",), "broken": ("fail=1",)},
)


@pytest.fixture
def grid(monkeypatch):
    monkeypatch.setattr(comparison, "load_grid", lambda name: GRID)
    return GRID


def test_mean_std_are_the_sample_statistics():
    values = [0.61, 0.64, 0.58]
    mean, std = comparison.mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert std == pytest.approx(float(np.std(values, ddof=1)))
    assert comparison.mean_std([0.7]) == (0.7, 0.0)


def test_grid_runs_aggregates_and_reports_failures(tmp_path, grid, capsys):
    out = tmp_path / "report"
    code = compare.main(["--grid", "fake", "--root", str(tmp_path / "runs"), "--out", str(out)])
    assert code == 1  # a failed run makes the command fail, after reporting everything else
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["variant"]: row for row in report["table"]}
    assert rows["base"]["n"] == 3 and rows["better"]["n"] == 3
    assert rows["base"]["final_test_accuracy"]["by_seed"] == {"0": 0.5, "1": 0.51, "2": 0.52}
    assert rows["better"]["final_test_accuracy"]["mean"] == pytest.approx(0.61)
    assert rows["better"]["final_test_accuracy"]["std"] == pytest.approx(0.01)
    assert rows["base"]["best_test_accuracy"]["mean"] == pytest.approx(0.511)
    assert rows["base"]["train_img_per_s"] == pytest.approx(101.0) and rows["base"]["parameters"] == 1234
    # The broken variant failed on every seed: reported as failed, nothing averaged.
    assert rows["broken"]["n"] == 0 and rows["broken"]["failed_seeds"] == [0, 1, 2]
    assert np.isnan(rows["broken"]["final_test_accuracy"]["mean"])
    failed_run = next(r for r in report["runs"] if r["variant"] == "broken" and r["seed"] == 0)
    assert failed_run["status"] == "failed" and "boom" in failed_run["failure"]["output_tail"]
    markdown = out.with_suffix(".md").read_text()
    assert "| better | 3 | 61.00 ± 1.00 (60.00, 61.00, 62.00)" in markdown
    assert "seed 0 failed" in markdown
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "[9/9] broken seed 2: failed" in capsys.readouterr().out


def test_a_half_finished_grid_resumes_and_reuses_finished_runs(tmp_path, grid, capsys):
    root = tmp_path / "runs"
    assert compare.main(["--grid", "fake", "--root", str(root), "--variants", "base", "--seeds", "0"]) == 0
    partial = comparison.run_dir(root, "better", 1)
    partial.mkdir(parents=True)  # started but killed: no summary yet
    assert comparison.run_status(partial) == "partial"
    capsys.readouterr()
    compare.main(["--grid", "fake", "--root", str(root), "--variants", "base,better", "--seeds", "0,1"])
    log = capsys.readouterr().out
    assert "base seed 0: done, reused" in log and "better seed 1: resuming" in log
    calls = (comparison.run_dir(root, "base", 0) / "calls.txt").read_text().splitlines()
    assert len(calls) == 1  # the finished run was not run again
    assert comparison.run_status(partial) == "done"
    # --report_only runs nothing and still reports the unfinished runs as such.
    assert compare.main(["--grid", "fake", "--root", str(root), "--report_only"]) == 0
    report = json.loads((root / "report.json").read_text())
    base = next(row for row in report["table"] if row["variant"] == "base")
    assert base["n"] == 2 and base["unfinished_seeds"] == [2]


def test_run_commands_name_the_config_variant_and_seed(tmp_path):
    command = comparison.run_command(GRID, tmp_path, "better", 2)
    assert command[1:5] == ["-m", "tests.fake_experiment", "--config", "unused"]
    assert command[-2:] == ["bonus=0.1", "train.seed=2"]
    with pytest.raises(ValueError, match="plain folder name"):
        Grid(experiment="x", config="y", variants={"a/b": ()})
    with pytest.raises(ValueError, match="unknown grid"):
        comparison.load_grid("does_not_exist")


def test_a_grid_with_a_shared_parent_trains_it_first_and_reports_its_metric(tmp_path, monkeypatch, capsys):
    grid = Grid(
        experiment="tests.fake_experiment",
        config="unused",
        seeds=(0, 1),
        parent=("bonus=0.5",),
        variants={"child": (), "hkt": ("bonus=0.2",)},
        metric="epe",
        metric_label="test EPE (px)",
        scale=1.0,
    )
    monkeypatch.setattr(comparison, "load_grid", lambda name: grid)
    root, out = tmp_path / "runs", tmp_path / "report"
    assert compare.main(["--grid", "flowish", "--root", str(root), "--out", str(out)]) == 0
    (parent_call,) = (root / "parent" / "calls.txt").read_text().splitlines()
    assert "method=parent" in parent_call and "bonus=0.5" in parent_call
    (child_call,) = (comparison.run_dir(root, "hkt", 1) / "calls.txt").read_text().splitlines()
    assert f"parent_ckpt={root / 'parent' / 'export' / 'child'}" in child_call
    assert "[parent] running" in capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["variant"]: row for row in report["table"]}
    assert rows["hkt"]["final_test_epe"]["mean"] == pytest.approx(1.85)
    assert rows["child"]["best_test_epe"]["by_seed"] == {"0": pytest.approx(1.95), "1": pytest.approx(2.05)}
    assert report["parent"]["status"] == "done"
    markdown = out.with_suffix(".md").read_text()
    assert "final test EPE (px)" in markdown and "| hkt | 2 | 1.85 ± 0.07 (1.80, 1.90)" in markdown
    assert "Shared parent" in markdown and "final 1.50" in markdown
    compare.main(["--grid", "flowish", "--root", str(root), "--out", str(out)])  # rerun: everything reused
    assert "[parent] done, reused" in capsys.readouterr().out
    assert len((root / "parent" / "calls.txt").read_text().splitlines()) == 1


def test_paired_differences_match_scipys_paired_t_interval():
    from scipy import stats

    hkt = {0: 0.912, 1: 0.905, 2: 0.921}
    child = {0: 0.901, 1: 0.899, 2: 0.915, 3: 0.9}  # seed 3 has no partner: left out
    diff = comparison.paired_difference(hkt, child)
    reference = stats.ttest_rel([hkt[s] for s in (0, 1, 2)], [child[s] for s in (0, 1, 2)])
    low, high = reference.confidence_interval(0.95)
    assert diff["n"] == 3 and diff["mean"] == pytest.approx(np.mean([0.011, 0.006, 0.006]))
    assert diff["ci95"] == pytest.approx([low, high])
    assert comparison.paired_difference({0: 0.5}, {0: 0.4})["ci95"] is None  # one seed: no interval
    assert comparison.paired_difference({0: 0.5}, {1: 0.4}) is None


def test_table_pairs_every_variant_with_child_and_kd_and_names_its_facts(tmp_path):
    grid = Grid(
        experiment="x",
        config="cfg",
        seeds=(0, 1),
        variants={"child": (), "kd": (), "hkt": ()},
        variant_configs={"hkt": "other"},
    )
    assert comparison.run_command(grid, tmp_path, "hkt", 0)[4] == "other"
    assert comparison.run_command(grid, tmp_path, "kd", 0)[4] == "cfg"
    with pytest.raises(ValueError, match="does not have: nope"):
        Grid(experiment="x", config="y", variants={"a": ()}, variant_configs={"nope": "z"})
    scores = {"child": (0.90, 0.91), "kd": (0.91, 0.915), "hkt": (0.92, 0.93)}
    for variant, values in scores.items():
        for seed, value in enumerate(values):
            directory = comparison.run_dir(tmp_path, variant, seed)
            directory.mkdir(parents=True)
            (directory / "summary.json").write_text(
                json.dumps(
                    {"final_test_accuracy": value, "best_test_accuracy": value, "device": "1 x H200", "jax": "0.11.2"}
                )
            )
            (directory / "config.json").write_text(json.dumps({"train": {"epochs": 200.0, "steps": None}}))
            comparison.record_attempt(directory, "abc123", 100.0, "stopped")
            comparison.record_attempt(directory, "def456", 50.0, "done")
    records = [comparison.run_record(grid, tmp_path, v, s) for s in (0, 1) for v in grid.variants]
    table = comparison.aggregate(records, list(grid.variants), comparison.metric_keys(grid))
    hkt = next(row for row in table if row["variant"] == "hkt")
    assert hkt["best_test_accuracy"]["vs"]["child"]["mean"] == pytest.approx(0.02)
    assert hkt["best_test_accuracy"]["vs"]["kd"]["by_seed"] == {0: pytest.approx(0.01), 1: pytest.approx(0.015)}
    assert "child" not in next(row for row in table if row["variant"] == "child")["best_test_accuracy"]["vs"]
    assert hkt["wall_s_by_seed"] == {0: 150.0, 1: 150.0}
    facts = comparison.grid_facts(records)
    assert facts == {
        "device": "1 x H200",
        "jax": "0.11.2",
        "epochs": 200.0,
        "steps": None,
        "commits": ["abc123", "def456"],
    }
    markdown = comparison.markdown_table(table, grid)
    assert "best − child (paired, 95 % CI)" in markdown and "| hkt | 2 |" in markdown
    assert "+2.00 [" in markdown


def test_parent_ckpt_swaps_in_another_parent_and_launches_are_recorded(tmp_path, monkeypatch, capsys):
    grid = Grid(
        experiment="tests.fake_experiment",
        config="unused",
        seeds=(0,),
        parent=("bonus=0.5",),
        variants={"hkt": ("bonus=0.2",)},
    )
    monkeypatch.setattr(comparison, "load_grid", lambda name: grid)
    assert compare.main(["--grid", "g", "--root", str(tmp_path), "--parent_ckpt", "converted/r56", "--dry_run"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # no parent run: only the variant's command
    assert "parent_ckpt=converted/r56" in line and "method=parent" not in line
    assert compare.main(["--grid", "g", "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 0
    (attempt,) = comparison.read_attempts(comparison.run_dir(tmp_path / "runs", "hkt", 0))
    assert attempt["outcome"] == "done" and attempt["wall_s"] > 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"device", "jax", "epochs", "commits"} <= set(report)


def test_extra_metrics_and_the_papers_numbers_are_reported(tmp_path):
    grid = Grid(
        experiment="x",
        config="c",
        seeds=(0, 1),
        variants={"child": (), "hkt": ()},
        metric="dice",
        extra_metrics=(("dice_global/liver", "liver Dice global %"),),
        paper={"hkt": "94.1"},
    )
    for variant, offset in (("child", 0.0), ("hkt", 0.01)):
        for seed in (0, 1):
            directory = comparison.run_dir(tmp_path, variant, seed)
            directory.mkdir(parents=True)
            test = {"dice": 0.9 + offset, "dice_global/liver": 0.92 + offset + seed / 100}
            (directory / "summary.json").write_text(
                json.dumps(
                    {
                        "final_test_dice": test["dice"],
                        "best_test_dice": test["dice"],
                        "final_test": test,
                        **({"best_test": test} if seed else {}),
                    }
                )
            )  # seed 0: written before best_test existed
    records = [comparison.run_record(grid, tmp_path, v, s) for s in (0, 1) for v in grid.variants]
    table = comparison.aggregate(records, list(grid.variants), comparison.report_keys(grid))
    hkt = next(row for row in table if row["variant"] == "hkt")
    assert hkt["final_test_dice_global/liver"]["by_seed"] == {0: pytest.approx(0.93), 1: pytest.approx(0.94)}
    assert hkt["best_test_dice_global/liver"]["by_seed"] == {1: pytest.approx(0.94)}
    assert hkt["final_test_dice_global/liver"]["vs"]["child"]["mean"] == pytest.approx(0.01)
    markdown = comparison.markdown_table(table, grid)
    assert "final liver Dice global % | best-on-validation liver Dice global % | paper |" in markdown
    assert "| 93.50 ± 0.71 (93.00, 94.00) | 94.00 | 94.1 |" in markdown
