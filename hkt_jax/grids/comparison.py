"""Variants x seeds of one experiment: the grid, each run's status, and the aggregated table.

Why: one run per method (as the paper reports) cannot say whether HKT helps; the
spread over seeds can. A grid names its variants as config overrides; every run
lives in ``ROOT/<variant>/seed<k>`` and is an ordinary, resumable experiment
workdir, so a half-finished grid carries on where it stopped. A run that failed
is reported as failed and never averaged in.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import statistics
import subprocess
from pathlib import Path
from typing import Any, Sequence

from scipy import stats

FAILED_FILE = "failed.json"
SUMMARY_FILE = "summary.json"
ATTEMPTS_FILE = "attempts.json"  # every launch of a run: the commit it ran and its wall time
PARENT_DIR = "parent"  # ROOT/parent: the grid's shared parent run, when it has one
PAIRED_BASELINES = ("child", "kd")  # variants every other variant is compared with, seed by seed


@dataclasses.dataclass(frozen=True)
class Grid:
    """Variants (name -> config overrides) x seeds of one experiment config."""

    experiment: str  # module run with ``python -m``, e.g. "experiments.cifar_hkt"
    config: str  # its --config
    variants: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...] = (0, 1, 2)
    common: tuple[str, ...] = ()  # overrides every run gets
    seed_key: str = "train.seed"
    description: str = ""
    # What the table reports: summary keys final_test_<metric> and best_test_<metric>, validation curve
    # eval_<metric>; shown times ``scale`` (100: fractions as %) under ``metric_label``.
    metric: str = "accuracy"
    metric_label: str = "test acc. %"
    scale: float = 100.0
    # Overrides of one parent run trained first in ROOT/parent (``method=parent``, seed 0); every variant then
    # gets its export as ``parent_ckpt``. None: the config names its parent (or each run trains its own).
    parent: tuple[str, ...] | None = None
    # Variants built from another config than ``config`` (name -> config), so a variant such as the released
    # code's ``reference`` has one definition: its config file.
    variant_configs: dict[str, str] = dataclasses.field(default_factory=dict)
    # More test metrics to report beside ``metric``: (name in the summary's final_test / best_test, label),
    # e.g. ("dice_global/liver", "liver Dice global %") next to the per-case Dice segmentation selects on.
    extra_metrics: tuple[tuple[str, str], ...] = ()
    # The paper's number for a variant, shown in its own column (e.g. {"hkt": "94.1 (D-Mean)"}).
    paper: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.variants:
            raise ValueError("a grid needs at least one variant")
        if PARENT_DIR in self.variants and self.parent is not None:
            raise ValueError(f"variant name {PARENT_DIR!r} is the shared parent run's folder")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"grid seeds must be distinct and non-empty, got {self.seeds}")
        for name in self.variants:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"variant name {name!r} must be a plain folder name")
        unknown = sorted(set(self.variant_configs) - set(self.variants))
        if unknown:
            raise ValueError(f"variant_configs names variants the grid does not have: {', '.join(unknown)}")

    def config_for(self, variant: str) -> str:
        return self.variant_configs.get(variant, self.config)


def load_grid(name: str) -> Grid:
    """``GRID`` of ``experiments/configs/grid_<name>.py``."""
    module_name = f"experiments.configs.grid_{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        known = ", ".join(grid_names()) or "none"
        raise ValueError(f"unknown grid {name!r}: no experiments/configs/grid_{name}.py (grids: {known})") from None
    return module.GRID


def grid_names() -> list[str]:
    """Names ``--grid`` takes: the ``grid_<name>.py`` files of ``experiments/configs``."""
    try:
        configs = importlib.import_module("experiments.configs")
    except ModuleNotFoundError:  # the library without its experiments folder
        return []
    return sorted(
        module.name.removeprefix("grid_")
        for module in pkgutil.iter_modules(configs.__path__)
        if module.name.startswith("grid_")
    )


def run_dir(root: Path, variant: str, seed: int) -> Path:
    return Path(root) / variant / f"seed{seed}"


def parent_dir(root: Path) -> Path:
    return Path(root) / PARENT_DIR


def parent_command(grid: Grid, root: Path, python: str = "python") -> list[str]:
    """The shared parent run's command line (only for grids with ``parent``)."""
    return [
        python,
        "-m",
        grid.experiment,
        "--config",
        grid.config,
        "--workdir",
        str(parent_dir(root)),
        *grid.common,
        *grid.parent,
        "method=parent",
        f"{grid.seed_key}=0",
    ]


def run_command(grid: Grid, root: Path, variant: str, seed: int, python: str = "python") -> list[str]:
    """The exact command line of one run (rerunning it resumes the run)."""
    parent = [f"parent_ckpt={parent_dir(root) / 'export' / 'child'}"] if grid.parent is not None else []
    return [
        python,
        "-m",
        grid.experiment,
        "--config",
        grid.config_for(variant),
        "--workdir",
        str(run_dir(root, variant, seed)),
        *grid.common,
        *parent,
        *grid.variants[variant],
        f"{grid.seed_key}={seed}",
    ]


def run_status(directory: Path) -> str:
    """ "done" (summary written), "failed" (last attempt exited non-zero), "partial" or "pending"."""
    directory = Path(directory)
    if (directory / SUMMARY_FILE).exists():
        return "done"
    if (directory / FAILED_FILE).exists():
        return "failed"
    return "partial" if directory.exists() else "pending"


def record_failure(directory: Path, returncode: int, output_tail: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / FAILED_FILE).write_text(json.dumps({"returncode": returncode, "output_tail": output_tail}, indent=2))


def clear_failure(directory: Path) -> None:
    (Path(directory) / FAILED_FILE).unlink(missing_ok=True)


def read_attempts(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / ATTEMPTS_FILE
    return json.loads(path.read_text()) if path.exists() else []


def record_attempt(directory: Path, commit: str | None, wall_s: float, outcome: str) -> None:
    """Append one launch of a run (the code it ran and how long): a run continued over several GPU slots
    keeps every commit that trained it and its total wall time."""
    attempts = read_attempts(directory) + [{"commit": commit, "wall_s": round(float(wall_s), 3), "outcome": outcome}]
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / ATTEMPTS_FILE).write_text(json.dumps(attempts, indent=1))


def current_commit(repo: Path | None = None) -> str | None:
    """``git describe``-style id of the code a run is launched with (``+dirty`` with uncommitted changes)."""
    repo = Path(repo or Path(__file__).resolve().parent.parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_record(grid: Grid, root: Path, variant: str, seed: int) -> dict[str, Any]:
    """One run's status and numbers, as the report's JSON keeps them."""
    directory = run_dir(root, variant, seed)
    record: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "status": run_status(directory),
        "workdir": str(directory),
        "overrides": [*grid.common, *grid.variants[variant]],
    }
    if record["status"] == "failed":
        record["failure"] = json.loads((directory / FAILED_FILE).read_text())
    attempts = read_attempts(directory)
    if attempts:
        record["commits"] = sorted({a["commit"] for a in attempts if a.get("commit")})
        record["wall_s"] = sum(a["wall_s"] for a in attempts)
    if record["status"] != "done":
        return record
    record["summary"] = json.loads((directory / SUMMARY_FILE).read_text())
    for name, _ in grid.extra_metrics:  # flat keys, as the table reads the selection metric
        for which in ("final_test", "best_test"):
            record["summary"][f"{which}_{name}"] = (record["summary"].get(which) or {}).get(name)
    config_path = directory / "config.json"
    record["config"] = json.loads(config_path.read_text()) if config_path.exists() else None
    rows = read_metrics(directory)
    speeds = [r["img_per_s"] for r in rows if "img_per_s" in r]
    record["train_img_per_s"] = statistics.median(speeds) if speeds else None
    curve_key = f"eval_{grid.metric}"
    record["validation_curve"] = [
        (r["step"], r[curve_key]) for r in rows if curve_key in r and r.get("split", "validation") == "validation"
    ]
    diagnostics = sorted({k for r in rows for k in r if k.startswith(("gate/", "ga_ratio/"))})
    record["diagnostics"] = {k: [(r["step"], r[k]) for r in rows if k in r] for k in diagnostics}
    return record


def parent_record(grid: Grid, root: Path) -> dict[str, Any]:
    """The shared parent run's status, command and summary."""
    directory = parent_dir(root)
    record: dict[str, Any] = {
        "status": run_status(directory),
        "workdir": str(directory),
        "command": parent_command(grid, root),
    }
    if record["status"] == "done":
        record["summary"] = json.loads((directory / SUMMARY_FILE).read_text())
    return record


def parent_line(grid: Grid, record: dict[str, Any]) -> str:
    if record["status"] != "done":
        return f"\nShared parent ({record['workdir']}): {record['status']}.\n"
    summary = record["summary"]
    final_key, best_key = metric_keys(grid)
    values = [
        f"{label} {grid.scale * summary[key]:.2f}"
        for label, key in (("final", final_key), ("best-on-validation", best_key))
        if summary.get(key) is not None
    ]
    params = f", {summary['parameters']:,} parameters" if summary.get("parameters") else ""
    return f"\nShared parent ({record['workdir']}{params}): {grid.metric_label} " + ", ".join(values) + ".\n"


def metric_keys(grid: Grid) -> tuple[str, str]:
    return f"final_test_{grid.metric}", f"best_test_{grid.metric}"


def report_keys(grid: Grid) -> tuple[str, ...]:
    """Every summary number the table aggregates: the selection metric's, then each extra metric's."""
    return (
        *metric_keys(grid),
        *(f"{which}_{name}" for name, _ in grid.extra_metrics for which in ("final_test", "best_test")),
    )


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """``values - baseline`` over the seeds both have: the mean difference with a 95 % Student-t interval.

    Paired by seed because a seed fixes the data order (and the child's initialisation) in every variant, so
    the seed-to-seed spread that both share drops out of the comparison. None when no seed is shared."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    diffs = [float(values[s]) - float(baseline[s]) for s in seeds]
    mean, std = mean_std(diffs)
    if len(diffs) > 1:
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs))
        interval = [mean - half, mean + half]
    else:
        interval = None  # one seed: no spread to build an interval from
    return {"mean": mean, "ci95": interval, "n": len(diffs), "by_seed": dict(zip(seeds, diffs))}


def aggregate(records: Sequence[dict[str, Any]], variants: Sequence[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant: mean ± std over the finished seeds of each summary number in ``keys``, every seed's
    value, the paired difference to each of ``PAIRED_BASELINES`` present, and the seeds that failed or
    have not finished (never averaged in)."""
    table = []
    for variant in variants:
        mine = [r for r in records if r["variant"] == variant]
        done = sorted((r for r in mine if r["status"] == "done"), key=lambda r: r["seed"])
        row: dict[str, Any] = {
            "variant": variant,
            "n": len(done),
            "failed_seeds": [r["seed"] for r in mine if r["status"] == "failed"],
            "unfinished_seeds": [r["seed"] for r in mine if r["status"] in ("partial", "pending")],
        }
        for key in keys:
            values = {r["seed"]: r["summary"].get(key) for r in done if r["summary"].get(key) is not None}
            mean, std = mean_std(list(values.values()))
            row[key] = {"mean": mean, "std": std, "by_seed": values}
        params = {r["summary"].get("parameters") for r in done}
        row["parameters"] = params.pop() if len(params) == 1 else sorted(p for p in params if p is not None) or None
        speeds = [r["train_img_per_s"] for r in done if r.get("train_img_per_s")]
        row["train_img_per_s"] = statistics.median(speeds) if speeds else None
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        row["wall_s_by_seed"] = {r["seed"]: r["wall_s"] for r in done if r.get("wall_s")}
        row["wall_s_median"] = statistics.median(walls) if walls else None
        table.append(row)
    by_variant = {row["variant"]: row for row in table}
    for row in table:
        for key in keys:
            row[key]["vs"] = {
                baseline: paired_difference(row[key]["by_seed"], by_variant[baseline][key]["by_seed"])
                for baseline in PAIRED_BASELINES
                if baseline in by_variant and baseline != row["variant"]
            }
    return table


def grid_facts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the grid ran on, read from its finished runs: devices, JAX versions, epochs, commits."""
    done = [r for r in records if r["status"] == "done"]

    def distinct(values):
        values = sorted({v for v in values if v is not None}, key=str)
        return values[0] if len(values) == 1 else (values or None)

    trains = [(r.get("config") or {}).get("train") or {} for r in done]
    epochs = [train.get("epochs") if train.get("steps") is None else None for train in trains]
    return {
        "device": distinct(r["summary"].get("device") for r in done),
        "jax": distinct(r["summary"].get("jax") for r in done),
        "epochs": distinct(epochs),
        "steps": distinct(r["summary"].get("steps") for r in done),
        "commits": sorted({c for r in records for c in r.get("commits", [])}),
    }


def _stat(stat: dict[str, Any], scale: float) -> str:
    if not stat["by_seed"]:
        return "–"
    seeds = ", ".join(f"{scale * v:.2f}" for _, v in sorted(stat["by_seed"].items()))
    if len(stat["by_seed"]) == 1:
        return seeds
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f} ({seeds})"


def _difference(diff: dict[str, Any] | None, scale: float) -> str:
    if not diff:
        return "–"
    text = f"{scale * diff['mean']:+.2f}"
    if diff["ci95"]:
        low, high = diff["ci95"]
        text += f" [{scale * low:+.2f}, {scale * high:+.2f}]"
    return text


def markdown_table(table: Sequence[dict[str, Any]], grid: Grid) -> str:
    final_key, best_key = metric_keys(grid)
    baselines = [b for b in PAIRED_BASELINES if any(b in row[best_key].get("vs", {}) for row in table)]
    extras = [(f"final_test_{name}", f"final {label}") for name, label in grid.extra_metrics] + [
        (f"best_test_{name}", f"best-on-validation {label}") for name, label in grid.extra_metrics
    ]
    extras = [(key, label) for key, label in extras if any(key in row for row in table)]
    paper = [grid.paper] if grid.paper else []
    lines = [
        f"| variant | n | final {grid.metric_label} (mean ± std; per seed) | best-on-validation "
        f"{grid.metric_label} | "
        + "".join(f"best − {b} (paired, 95 % CI) | " for b in baselines)
        + "".join(f"{label} | " for _, label in extras)
        + "".join("paper | " for _ in paper)
        + "child params | train img/s | failed / unfinished |",
        "|---|---|---|---|" + "---|" * (len(baselines) + len(extras) + len(paper)) + "---|---|---|",
    ]
    for row in table:
        speed = f"{row['train_img_per_s']:.0f}" if row["train_img_per_s"] else "–"
        params = f"{row['parameters']:,}" if isinstance(row["parameters"], int) else str(row["parameters"] or "–")
        problems = (
            ", ".join(
                [f"seed {s} failed" for s in row["failed_seeds"]]
                + [f"seed {s} unfinished" for s in row["unfinished_seeds"]]
            )
            or "–"
        )
        differences = "".join(f"{_difference(row[best_key].get('vs', {}).get(b), grid.scale)} | " for b in baselines)
        differences += "".join(f"{_stat(row[key], grid.scale) if key in row else '–'} | " for key, _ in extras)
        differences += "".join(f"{grid.paper.get(row['variant'], '–')} | " for _ in paper)
        lines.append(
            f"| {row['variant']} | {row['n']} | {_stat(row[final_key], grid.scale)} "
            f"| {_stat(row[best_key], grid.scale)} | {differences}{params} | {speed} | {problems} |"
        )
    return "\n".join(lines) + "\n"
