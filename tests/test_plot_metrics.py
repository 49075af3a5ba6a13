"""experiments.plot_metrics: every loss family on its own scale, GA and learning-rate panels, one colour per run."""

from __future__ import annotations

import json

import pytest

from experiments.plot_metrics import build_figure, main


def write_run(workdir, rows, config=None):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if config is not None:
        (workdir / "config.json").write_text(json.dumps(config))
    return workdir


def hkt_rows(gate_to_parent_offset=0.0):
    rows = []
    for step in (10, 20, 30):
        gate = 0.99 + step * 1e-4
        rows.append(
            {
                "step": step,
                "loss": 1.1 - step / 100,
                "l1": 0.17 - step / 1000,
                "l2": 2.1 - step / 50,
                "l3": 0.03 + step / 10000,
                "accuracy": step / 100,
                "lr": 0.05 * step / 30,
                "gate/to_child_0": gate,
                "gate/to_parent_0": gate + gate_to_parent_offset,
            }
        )
        if step % 20 == 0:
            row = {"step": step, "eval_accuracy": 0.4, "eval_loss": 1.5, "split": "validation"}
            rows += [row, row, {**row, "eval_accuracy": 0.9, "split": "test"}]
    return rows


@pytest.fixture
def runs(tmp_path):
    hkt = write_run(tmp_path / "hkt", hkt_rows(), {"method": "hkt", "hkt": {"inherit_loss": "mae"}})
    child_rows = [
        {"step": s, "loss": 2.3, "l1": 0.0, "l2": 2.3, "l3": 0.0, "accuracy": 0.2, "lr": 0.01} for s in (10, 20)
    ]
    child = write_run(tmp_path / "child", child_rows, {"method": "child", "hkt": {"inherit_loss": "mae"}})
    return hkt, child


def axis(fig, title_start):
    (ax,) = [ax for ax in fig.axes if ax.get_title().startswith(title_start)]
    return ax


def line_data(ax):
    """(steps, values) per drawn line, values rounded so float arithmetic in the fixtures compares exactly."""
    return [(tuple(line.get_xdata()), tuple(round(float(y), 9) for y in line.get_ydata())) for line in ax.get_lines()]


def test_loss_families_have_their_own_labelled_axes(runs):
    fig = build_figure(runs)
    task, inherit = axis(fig, "task loss"), axis(fig, "inheritance terms")
    assert line_data(task) == [((10, 20, 30), (1.9, 1.7, 1.5)), ((10, 20), (2.3, 2.3))]
    # L1 and L3 of the HKT run only: the child run's zeros are not drawn.
    assert [ys for _, ys in line_data(inherit)] == [(0.16, 0.15, 0.14), (0.031, 0.032, 0.033)]
    low, high = inherit.get_ylim()
    assert high - low < 0.5, "L1/L3 get a scale of their own, not the cross-entropy's"
    assert inherit.get_ylabel() == "loss (MAE)"
    assert task.get_ylabel() == "cross-entropy (nats)"
    for ax in fig.axes:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel(), ax.get_title()


def test_each_run_keeps_its_colour_in_every_panel(runs):
    fig = build_figure(runs)
    hkt_colour, child_colour = (handle.get_color() for handle in fig.legends[0].legend_handles)
    assert hkt_colour != child_colour
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["hkt (hkt)", "child (child)"]
    for title in ("task loss", "training objective", "learning rate"):
        assert [line.get_color() for line in axis(fig, title).get_lines()] == [hkt_colour, child_colour], title
    assert {line.get_color() for line in axis(fig, "inheritance").get_lines()} == {hkt_colour}


def test_validation_accuracy_and_learning_rate(runs):
    fig = build_figure(runs)
    accuracy = line_data(axis(fig, "accuracy"))
    assert ((20,), (40.0,)) in accuracy, "validation rows only (not test), one point per step, in %"
    assert line_data(axis(fig, "learning rate"))[0] == ((10, 20, 30), (round(0.05 / 3, 9), round(0.1 / 3, 9), 0.05))


def test_identical_gate_pair_is_drawn_once_with_a_note(runs):
    ax = axis(build_figure(runs), "Genetic Attention")
    assert len(ax.get_lines()) == 1
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["gate/0 (to_child = to_parent)"]
    assert "to_child = to_parent (Transfer is the identity" in ax.get_legend().get_title().get_text()
    assert ax.get_ylabel().startswith("gate a")


def test_differing_gates_and_softmax_ratios_are_all_drawn(tmp_path):
    gates = write_run(tmp_path / "gates", hkt_rows(gate_to_parent_offset=-0.1))
    ratio_rows = [{"step": s, "loss": 1.0, "l2": 1.0, "ga_ratio/to_child_1": 0.01 * s, "lr": 0.1} for s in (5, 10)]
    ratios = write_run(tmp_path / "ratios", ratio_rows)
    ax = axis(build_figure([gates, ratios]), "Genetic Attention")
    names = [text.get_text() for text in ax.get_legend().get_texts()]
    assert names == ["gate/to_child_0", "gate/to_parent_0", "ga_ratio/to_child_1"]
    assert not ax.get_legend().get_title().get_text()
    assert "‖GA‖ / ‖x′‖" in ax.get_ylabel() and "gate a" in ax.get_ylabel()


def test_main_writes_png_and_reports_runs_without_metrics(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert main([str(run) for run in runs] + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(out)]) == 2
    assert "no metrics.jsonl rows" in capsys.readouterr().err


def test_runs_of_different_tasks_are_refused(runs, tmp_path, capsys):
    flow = write_run(
        tmp_path / "flow", [{"step": 10, "loss": 3.0, "epe": 4.0, "lr": 0.1}], {"method": "hkt", "task": "flow"}
    )
    assert main([str(runs[0]), str(flow), "--out", str(tmp_path / "mixed.png")]) == 2
    error = capsys.readouterr().err
    assert "runs of different tasks cannot share one figure" in error
    assert f"{runs[0]}: classification; {flow}: flow" in error and not (tmp_path / "mixed.png").exists()


@pytest.mark.parametrize(
    "task, metric, rows, loss_label, metric_label, drawn",
    [
        (
            "flow",
            "end-point error",
            [
                {"step": 10, "loss": 3.0, "l2": 3.0, "epe": 4.0, "lr": 0.1},
                {"step": 10, "eval_epe": 5.0, "eval_loss": 3.5, "split": "validation"},
            ],
            "sequence loss (px)",
            "EPE of the final flow (px)",
            [((10,), (4.0,)), ((10,), (5.0,))],
        ),
        (
            "segmentation",
            "Dice",
            [
                {"step": 10, "loss": 0.9, "l2": 0.9, "dice": 0.25, "pixel_accuracy": 0.8, "lr": 0.1},
                {"step": 10, "eval_dice": 0.5, "eval_pixel_accuracy": 0.9, "split": "validation"},
            ],
            "cross-entropy + soft Dice",
            "Dice (%)",
            [((10,), (25.0,)), ((10,), (50.0,))],
        ),
        (
            "toy_segmentation",
            "Dice",  # its training rows log pixel accuracy only: validation Dice alone
            [
                {"step": 10, "loss": 0.7, "l2": 0.7, "pixel_accuracy": 0.6, "lr": 0.1},
                {"step": 10, "eval_dice": 0.75, "eval_pixel_accuracy": 0.9, "split": "validation"},
            ],
            "pixel cross-entropy (nats)",
            "Dice (%)",
            [((10,), (75.0,))],
        ),
    ],
)
def test_axes_follow_the_task_of_the_runs(tmp_path, task, metric, rows, loss_label, metric_label, drawn):
    fig = build_figure([write_run(tmp_path / task, rows, {"method": "child", "task": task})])
    assert axis(fig, "task loss").get_ylabel() == loss_label
    assert line_data(axis(fig, metric)) == drawn
    assert axis(fig, metric).get_ylabel() == metric_label
    assert not [ax for ax in fig.axes if ax.get_title() == "accuracy"], "no CIFAR panel on another task's runs"


def test_unregistered_task_says_its_metric_is_unknown(tmp_path):
    run = write_run(
        tmp_path / "mine",
        [{"step": 1, "loss": 1.0, "l2": 1.0, "iou": 0.3, "lr": 0.1}],
        {"method": "child", "task": "my_task"},
    )
    fig = build_figure([run])
    assert axis(fig, "task loss").get_ylabel() == "task loss"
    panel = axis(fig, "selection metric")
    assert not panel.get_lines()
    assert [text.get_text() for text in panel.texts] == ["task 'my_task' is not registered here: its metric is unknown"]
