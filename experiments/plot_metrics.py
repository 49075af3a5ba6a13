"""Plot training curves of one or more runs: ``python -m experiments.plot_metrics WORKDIR... [--out FILE.png]``.

Reads each run's ``metrics.jsonl`` (and ``config.json`` for the task, method and loss
kinds) and draws six panels, one scale each (so the runs must be of one task): the task
loss L2, the inheritance terms L1/L3 (MAE ~0.03-0.2 would vanish next to a cross-entropy
of ~2), the weighted objective, the task's selection metric (accuracy, EPE or Dice; training
batches and validation), the GA diagnostics per boundary and the learning rate. Each run keeps one colour in
every panel, so a baseline, a KD run and an HKT run compare at a glance.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)
from matplotlib.lines import Line2D  # noqa: E402

from hkt_jax.tasks import TASKS  # noqa: E402
from hkt_jax.training.metrics import METRICS_FILE, read_metrics  # noqa: E402

GA_KEY = re.compile(r"(?P<kind>gate|ga_ratio)/(?P<direction>to_child|to_parent)_(?P<boundary>\w+)")
GA_UNITS = {"gate": "gate a (1 = nothing inherited)", "ga_ratio": "‖GA‖ / ‖x′‖"}
IDENTICAL_GATES_NOTE = "to_child = to_parent (Transfer is the identity,\na is symmetric in x′ and τ): drawn once"
STYLES = ("-", "--", ":", "-.")
# Runs whose config.json names no task were written before tasks existed: CIFAR classification.
DEFAULT_TASK = "classification"
# Task -> (legend name of its L2, y label of the task-loss panel); other tasks get TASK_LOSS_FALLBACK.
TASK_LOSSES = {
    "classification": ("L2 task (cross-entropy)", "cross-entropy (nats)"),
    "flow": ("L2 task (sequence loss)", "sequence loss (px)"),
    "segmentation": ("L2 task (CE + soft Dice)", "cross-entropy + soft Dice"),
    "toy_segmentation": ("L2 task (pixel cross-entropy)", "pixel cross-entropy (nats)"),
}
TASK_LOSS_FALLBACK = ("L2 task", "task loss")
# Selection metric (a task's ``selection_metric``) -> (panel title, y label, factor on the logged value).
METRIC_AXES = {
    "accuracy": ("accuracy", "top-1 accuracy (%)", 100),
    "epe": ("end-point error", "EPE of the final flow (px)", 1),
    "dice": ("Dice", "Dice (%)", 100),
}


def _series(rows, key, *, evaluation=False):
    """(steps, values) of ``key``, the last value per step (eval rows: validation split only)."""
    by_step = {}
    for row in rows:
        if row.get(key) is None or any(k.startswith("eval_") for k in row) != evaluation:
            continue
        if evaluation and row.get("split", "validation") != "validation":
            continue
        by_step[row["step"]] = row[key]
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def _run_config(workdir: Path) -> dict:
    path = workdir / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); move it aside to plot the run without it") from None


def _metrics(workdir: Path) -> list[dict]:
    try:
        rows = read_metrics(workdir)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{workdir / METRICS_FILE}: a line is not JSON ({err.msg}); a run killed while writing "
            "leaves its last line cut: delete that line"
        ) from None
    if not rows:
        raise ValueError(f"{workdir}: no {METRICS_FILE} rows (is it a training run's workdir?)")
    return rows


def _inheritance_terms(rows, config: dict) -> list[tuple[str, tuple]]:
    """The non-task loss terms a run really logged, named by what they are for its method."""
    method = config.get("method", "hkt")
    kind = {"mae": "MAE", "ce": "CE", "seq": "sequence loss"}.get(config.get("hkt", {}).get("inherit_loss"), "")
    names = {"l1": f"L1 backbone {kind}".rstrip(), "l3": f"L3 head {kind}".rstrip()}
    baseline_terms = {"kd": "KD term", "fitnet": "FitNet hint MSE", "at": "attention transfer"}
    if method in baseline_terms:
        names = {"l3": baseline_terms[method]}
    terms = []
    for key, name in names.items():
        series = _series(rows, key)
        if any(value != 0 for value in series[1]):  # child/parent runs log L1 = L3 = 0
            terms.append((name, series))
    return terms


def _ga_diagnostics(rows) -> tuple[list[tuple[str, tuple]], list[str]]:
    """GA series per boundary; a to_child/to_parent pair with identical values is drawn once (returned in notes)."""
    keys = sorted({key for row in rows for key in row if GA_KEY.fullmatch(key)})
    series = {key: _series(rows, key) for key in keys}
    drawn, notes = [], []
    for key in keys:
        match = GA_KEY.fullmatch(key)
        twin = f"{match['kind']}/to_child_{match['boundary']}"
        if match["direction"] == "to_parent" and twin in series and series[twin] == series[key]:
            continue
        if match["direction"] == "to_child":
            other = f"{match['kind']}/to_parent_{match['boundary']}"
            if other in series and series[other] == series[key]:
                drawn.append((f"{match['kind']}/{match['boundary']} (to_child = to_parent)", series[key]))
                notes.append(match["boundary"])
                continue
        drawn.append((key, series[key]))
    return drawn, notes


def check_one_task(workdirs) -> str:
    """The task of the runs; refuses runs of different tasks: each panel has one scale and one label
    (cross-entropy or sequence loss, accuracy in % or EPE in px), so a second task's curves would be read
    on the first one's axis. Runs without a config.json are taken as they come."""
    tasks = {}
    for workdir in map(Path, workdirs):
        config = _run_config(workdir)
        if config:
            tasks[str(workdir)] = config.get("task", DEFAULT_TASK)
    if len(set(tasks.values())) > 1:
        runs = "; ".join(f"{workdir}: {task}" for workdir, task in tasks.items())
        raise ValueError(
            f"runs of different tasks cannot share one figure, whose panels have one scale each "
            f"({runs}): plot each task's runs with a command of their own"
        )
    return next(iter(tasks.values()), DEFAULT_TASK)


def metric_axis(task: str) -> tuple[str | None, str, str, float]:
    """(logged key, panel title, y label, factor) of the metric that selects ``task``'s best model.

    The key is None for a task this process has not registered (its module was not imported).
    """
    if task not in TASKS:
        return None, "selection metric", "-", 1
    metric = TASKS[task].selection_metric
    title, ylabel, scale = METRIC_AXES.get(metric, (metric, metric, 1))
    return metric, title, ylabel, scale


def build_figure(workdirs):
    """The figure (not saved); one colour per run across all panels; all runs of one task, whose loss and
    selection metric label the axes."""
    task = check_one_task(workdirs)
    loss_name, loss_label = TASK_LOSSES.get(task, TASK_LOSS_FALLBACK)
    metric, metric_title, metric_label, scale = metric_axis(task)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (ax_task, ax_inherit, ax_total), (ax_acc, ax_ga, ax_lr) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles_used = {ax: {} for ax in axes.flat}  # per panel: series name -> line style
    ga_kinds, identical_boundaries = set(), set()

    def draw(ax, name, steps, values, colour, **kwargs):
        style = styles_used[ax].setdefault(name, STYLES[len(styles_used[ax]) % len(STYLES)])
        ax.plot(steps, values, style, color=colour, linewidth=linewidth, **kwargs)

    run_handles = []
    for index, workdir in enumerate(workdirs):
        workdir = Path(workdir)
        rows = _metrics(workdir)
        config = _run_config(workdir)
        colour = colours[index % len(colours)]
        linewidth = 1.5 + 1.5 * (len(workdirs) - 1 - index) / max(len(workdirs) - 1, 1)  # equal curves stay visible
        label = (
            f"{workdir.name or workdir} ({config['method']})" if "method" in config else (workdir.name or str(workdir))
        )
        run_handles.append(Line2D([], [], color=colour, lw=2, label=label))

        task_key = "l2" if any(row.get("l2") is not None for row in rows) else "loss"
        draw(ax_task, loss_name, *_series(rows, task_key), colour)
        for name, series in _inheritance_terms(rows, config):
            draw(ax_inherit, name, *series, colour)
        draw(ax_total, "L = sum of alpha_i L_i", *_series(rows, "loss"), colour)
        if metric is not None:
            steps, values = _series(rows, metric)
            if steps:  # some tasks log their metric on validation only
                draw(ax_acc, "training batches", steps, [scale * v for v in values], colour, alpha=0.5)
            steps, values = _series(rows, f"eval_{metric}", evaluation=True)
            draw(ax_acc, "validation", steps, [scale * v for v in values], colour, marker="o")
        drawn, identical = _ga_diagnostics(rows)
        for name, series in drawn:
            draw(ax_ga, name, *series, colour)
            ga_kinds.add(name.split("/")[0])
        identical_boundaries.update(identical)
        draw(ax_lr, "learning rate", *_series(rows, "lr"), colour)

    inherit_kinds = {name.split()[-1] for name in styles_used[ax_inherit]} & {"MAE", "CE"}
    ga_unit = " or ".join(GA_UNITS[kind] for kind in sorted(ga_kinds)) or "-"
    panels = (
        (ax_task, "task loss L2 (native child)", loss_label),
        (
            ax_inherit,
            "inheritance terms L1 / L3 (own scale)",
            f"loss ({'/'.join(sorted(inherit_kinds))})" if inherit_kinds else "loss",
        ),
        (ax_total, "training objective", "weighted loss Σ αᵢ Lᵢ"),
        (ax_acc, metric_title, metric_label),
        (ax_ga, "Genetic Attention per boundary", ga_unit),
        (ax_lr, "learning rate", "learning rate"),
    )
    empty_notes = {
        ax_inherit: "no L1/L3 logged (child or parent runs)",
        ax_ga: "no GA diagnostics (not an HKT run)",
        ax_acc: f"no {metric} logged" if metric else f"task {task!r} is not registered here: its metric is unknown",
    }
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not styles_used[ax]:
            ax.text(0.5, 0.5, empty_notes.get(ax, "nothing logged"), ha="center", va="center", transform=ax.transAxes)
        elif len(styles_used[ax]) > 1 or ax in (ax_inherit, ax_ga):
            note = IDENTICAL_GATES_NOTE if ax is ax_ga and identical_boundaries else None
            ax.legend(
                handles=[
                    Line2D([], [], color="grey", linestyle=style, label=name) for name, style in styles_used[ax].items()
                ],
                fontsize="small",
                title=note,
                title_fontsize="x-small",
            )
    fig.legend(
        handles=run_handles, loc="upper center", ncol=min(len(run_handles), 4), title="run (colour)", fontsize="small"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def plot_runs(workdirs, out: Path) -> Path:
    return save_figure(build_figure(workdirs), out)


def save_figure(fig, out: Path) -> Path:
    """Write ``fig`` as a PNG (creating its folder) and free it; the experiments' one way to save a plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def check_out(out: Path) -> None:
    """An --out that cannot take the image is named before the runs are read."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; expected an image file name, e.g. --out {out / 'metrics.png'}")
    existing = next(parent for parent in out.parents if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder: choose an --out outside it")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plot_metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default="metrics.png", help="output PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        check_out(Path(args.out))
        path = plot_runs(args.workdirs, Path(args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
