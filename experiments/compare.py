"""Variants x seeds of an experiment -> a table (Markdown + JSON) and a plot.

    python -m experiments.compare --grid cifar_cpu --root workdirs/compare_cifar_cpu \\
        --out experiments/results/compare_cifar_cpu

Runs every variant of ``experiments/configs/grid_<NAME>.py`` for every seed, one
after the other, each in ``ROOT/<variant>/seed<k>`` as an ordinary experiment
run (its output goes to ``run.log`` there). A grid with a shared parent trains
it first in ``ROOT/parent`` and hands its export to every run. Finished runs are reused, unfinished
ones resume, failed ones are retried and, if they fail again, reported as failed
(never averaged). ``--report_only`` only re-aggregates what is on disk.
Writes ``OUT.md``, ``OUT.json`` (every run's numbers and config) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hkt_jax import comparison

TAIL_CHARS = 4000


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="grid name: experiments/configs/grid_<NAME>.py")
    parser.add_argument("--root", default=None, help="where the runs live (default: workdirs/compare_<grid>)")
    parser.add_argument("--out", default=None, help="report path without suffix (default: ROOT/report)")
    parser.add_argument("--report_only", action="store_true", help="aggregate what is on disk; run nothing")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the grid's variants")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the grid's seeds")
    parser.add_argument("--dry_run", action="store_true", help="print the run commands and exit")
    return parser.parse_args(argv)


def run_one(directory: Path, command: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    comparison.clear_failure(directory)
    with open(directory / "run.log", "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = (directory / "run.log").read_bytes()[-TAIL_CHARS:].decode(errors="replace")
        comparison.record_failure(directory, returncode, tail)
        return "failed"
    return comparison.run_status(directory)


def run_parent(grid, root: Path) -> bool:
    """Trains (or reuses, or resumes) the grid's shared parent; False if it failed."""
    directory = comparison.parent_dir(root)
    status = comparison.run_status(directory)
    if status == "done":
        print("[parent] done, reused", flush=True)
        return True
    print(f"[parent] {'resuming' if status == 'partial' else 'running'} (log: {directory / 'run.log'})", flush=True)
    start = time.perf_counter()
    status = run_one(directory, comparison.parent_command(grid, root, python=sys.executable))
    print(f"[parent] {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return status == "done"


def run_grid(grid, root: Path, variants, seeds) -> None:
    if grid.parent is not None and not run_parent(grid, root):
        print(f"[parent] failed: no variant can run without it; see {comparison.parent_dir(root) / 'run.log'}")
        return
    todo = [(v, s) for s in seeds for v in variants]  # seed-major: an early stop still has every variant
    for k, (variant, seed) in enumerate(todo, 1):
        status = comparison.run_status(comparison.run_dir(root, variant, seed))
        if status == "done":
            print(f"[{k}/{len(todo)}] {variant} seed {seed}: done, reused", flush=True)
            continue
        word = "resuming" if status == "partial" else "retrying" if status == "failed" else "running"
        print(f"[{k}/{len(todo)}] {variant} seed {seed}: {word} "
              f"(log: {comparison.run_dir(root, variant, seed) / 'run.log'})", flush=True)
        start = time.perf_counter()
        status = run_one(comparison.run_dir(root, variant, seed),
                         comparison.run_command(grid, root, variant, seed, python=sys.executable))
        print(f"[{k}/{len(todo)}] {variant} seed {seed}: {status} in {time.perf_counter() - start:.0f} s", flush=True)


def plot_report(records, table, path: Path, grid) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plot_metrics import save_figure

    variants = [row["variant"] for row in table]
    diag_runs = [r for r in records if r.get("diagnostics")]
    panels = 3 if diag_runs else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    ax = axes[0]
    for i, row in enumerate(table):
        final_key, best_key = comparison.metric_keys(grid)
        for offset, key, marker in ((-0.15, final_key, "o"), (0.15, best_key, "s")):
            stat = row[key]
            values = [grid.scale * v for v in stat["by_seed"].values()]
            ax.scatter([i + offset] * len(values), values, color=colors[row["variant"]], marker=marker, alpha=0.5, s=18)
            if values:
                ax.errorbar(i + offset, grid.scale * stat["mean"], yerr=grid.scale * stat["std"], color="black",
                            marker=marker, capsize=3, ms=5, label={final_key: "final (mean ± std)",
                                                                   best_key: "best on validation"}[key] if i == 0 else None)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel(grid.metric_label)
    ax.set_title(f"child {grid.metric_label} per seed")
    ax.legend(fontsize=8)
    ax = axes[1]
    for record in records:
        curve = record.get("validation_curve") or []
        if curve:
            steps, accs = zip(*curve)
            ax.plot(steps, [grid.scale * a for a in accs], color=colors[record["variant"]], alpha=0.6,
                    label=record["variant"] if record["seed"] == min(r["seed"] for r in records
                                                                     if r["variant"] == record["variant"]) else None)
    ax.set_xlabel("train step")
    ax.set_ylabel(f"validation {grid.metric}")
    ax.set_title("validation curves (one line per seed)")
    ax.legend(fontsize=8)
    if diag_runs:
        ax = axes[2]
        shown = set()
        for record in diag_runs:
            for key, series in record["diagnostics"].items():
                if "to_parent" in key:  # with identity Transfer the gate is symmetric; the child side suffices
                    continue
                steps, values = zip(*series)
                label = f"{record['variant']} {key}"
                ax.plot(steps, values, color=colors[record["variant"]], alpha=0.6,
                        label=label if label not in shown else None)
                shown.add(label)
        ax.set_xlabel("train step")
        ax.set_ylabel("gate a (gate GA) or ‖GA‖/‖x′‖ (softmax GA)")
        ax.set_title("GA diagnostics (parent -> child)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        grid = comparison.load_grid(args.grid)
        variants = args.variants.split(",") if args.variants else list(grid.variants)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(grid.seeds)
        unknown = [v for v in variants if v not in grid.variants] + [str(s) for s in seeds if s not in grid.seeds]
        if unknown:
            raise ValueError(f"not in grid {args.grid!r}: {', '.join(unknown)}; variants: {', '.join(grid.variants)}, "
                             f"seeds: {grid.seeds}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = Path(args.root or f"workdirs/compare_{args.grid}")
    if args.dry_run:
        if grid.parent is not None:
            print(" ".join(comparison.parent_command(grid, root)))
        for seed in seeds:
            for variant in variants:
                print(" ".join(comparison.run_command(grid, root, variant, seed)))
        return 0
    if not args.report_only:
        run_grid(grid, root, variants, seeds)
    records = [comparison.run_record(grid, root, v, s) for s in seeds for v in variants]
    table = comparison.aggregate(records, variants, comparison.metric_keys(grid))
    out = Path(args.out or root / "report")
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = comparison.markdown_table(table, grid)
    report = {"grid": args.grid, "table": table, "runs": records}
    if grid.parent is not None:
        report["parent"] = comparison.parent_record(grid, root)
        markdown += comparison.parent_line(grid, report["parent"])
    out.with_suffix(".md").write_text(f"# {args.grid}\n\n{grid.description}\n\n{markdown}")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot_report(records, table, out.with_suffix(".png"), grid)
    print(markdown)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    failed = sum(len(row["failed_seeds"]) for row in table)
    return 1 if failed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
