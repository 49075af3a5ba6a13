"""Variants x seeds of an experiment -> a table (Markdown + JSON) and a plot.

    python -m experiments.compare --grid cifar_cpu --root workdirs/compare_cifar_cpu \\
        --out experiments/results/compare_cifar_cpu

Runs every variant of ``experiments/configs/grid_<NAME>.py`` for every seed, seed
by seed, ``--parallel K`` at a time, each in ``ROOT/<variant>/seed<k>`` as an
ordinary experiment run (its output goes to ``run.log`` there). A grid with a
shared parent trains it first, alone, in ``ROOT/parent`` and hands its export to
every run. Finished runs are reused, unfinished ones resume, failed ones are
retried and, if they fail again, reported as failed (never averaged).
``--report_only`` only re-aggregates what is on disk.
Writes ``OUT.md``, ``OUT.json`` (every run's numbers and config) and ``OUT.png``.

For accelerator slots that end (docs/grids.md)::

    python -m experiments.compare --grid G --root ROOT --unpack pack_in \\
        --parallel 4 --time_budget 9 --pack pack_out

``--time_budget`` stops every run cleanly after MIN minutes (each saves its
current step; exit 0); ``--pack``/``--unpack`` carry the grid's state to the next
slot in a few small files. SIGTERM/SIGINT to this command stop the runs the same
way (exit 128 + the signal's number).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path

from hkt_jax.grids import comparison, pack as grid_pack, runs as grid_runs
from hkt_jax.training.preflight import check_model_checkpoint

MIN_START_S = 60.0  # no run starts with less of the time budget left (or a quarter of a shorter budget)
SIGNAL_GRACE_S = 1.0  # before forwarding: a run the signal reached too (a cgroup-wide SIGTERM) says so first


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", required=True, help="grid name: experiments/configs/grid_<NAME>.py")
    parser.add_argument("--root", default=None, help="where the runs live (default: workdirs/compare_<grid>)")
    parser.add_argument("--out", default=None, help="report path without suffix (default: ROOT/report)")
    parser.add_argument("--report_only", action="store_true", help="aggregate what is on disk; run nothing")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the grid's variants")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the grid's seeds")
    parser.add_argument("--dry_run", action="store_true", help="print the run commands and exit")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="K",
        help="run up to K runs at once, one process each (on one GPU each takes memory as it "
        "needs it, up to 0.9/K of it)",
    )
    parser.add_argument(
        "--time_budget",
        type=float,
        default=None,
        metavar="MIN",
        help="after MIN minutes every running run saves a checkpoint and stops (exit 0); the "
        "same command continues them and skips finished ones",
    )
    parser.add_argument(
        "--pack",
        default=None,
        metavar="DIR",
        help="at the end, write what a fresh machine needs to continue the grid into DIR "
        f"(at most {grid_pack.MAX_FILES} files, {grid_pack.MAX_BYTES // 2**20} MiB)",
    )
    parser.add_argument(
        "--unpack",
        default=None,
        metavar="DIR",
        help="first, restore --root from a pack written by --pack (into a fresh root)",
    )
    parser.add_argument(
        "--parent_ckpt",
        default=None,
        metavar="DIR",
        help="every run uses this parent (a model checkpoint dir, e.g. a converted ResNet-56) "
        "instead of the grid's own; use another --root for it",
    )
    return parser.parse_args(argv)


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text}: expected comma-separated integers, e.g. --seeds 0,1") from None


def _check_root(root: Path, args: argparse.Namespace) -> None:
    """A --root or --pack that is a file, or a missing --root with nothing to run, is named before anything
    runs or is written."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"--root {root}: is a file; expected the folder the grid's runs live (or will live) in")
    if args.pack and Path(args.pack).is_file():  # found now, not after the whole grid has run
        raise ValueError(f"--pack {args.pack}: is a file; choose an empty or new folder")
    if args.report_only and not args.unpack and not root.exists():
        raise ValueError(
            f"--root {root}: no such folder, so no runs to report: give the --root the grid ran in, "
            "or drop --report_only to run it"
        )


def _queued(label: str, directory: Path, command: list[str]) -> grid_runs.Job | None:
    """The job of one run, or None (and a line saying so) when it is finished already."""
    status = comparison.run_status(directory)
    if status == "done":
        print(f"{grid_runs.heading(label)} done, reused", flush=True)
        return None
    verb = {"partial": "resuming", "failed": "retrying"}.get(status, "running")
    return grid_runs.Job(label, directory, command, verb)


def run_grid(grid, root: Path, variants, seeds, runner: grid_runs.GridRunner) -> None:
    """The shared parent first, alone (every run loads it), then the runs, ``runner.parallel`` at a time."""
    if grid.parent is not None:
        job = _queued("[parent]", comparison.parent_dir(root), comparison.parent_command(grid, root, sys.executable))
        outcome = runner.run([job])["[parent]"] if job else "done"
        if outcome != "done":
            why = {
                "failed": f"it failed; see {comparison.parent_dir(root) / 'run.log'}",
                "stopped": "it stopped before finishing (rerun to continue it)",
            }.get(outcome, outcome)
            print(f"[parent] {why}: no run starts without it", flush=True)
            return
    todo = [(v, s) for s in seeds for v in variants]  # seed-major: an early stop still has every variant
    jobs = [
        _queued(
            f"[{k}/{len(todo)}] {variant} seed {seed}",
            comparison.run_dir(root, variant, seed),
            comparison.run_command(grid, root, variant, seed, python=sys.executable),
        )
        for k, (variant, seed) in enumerate(todo, 1)
    ]
    outcomes = runner.run([job for job in jobs if job])
    left = [label for label, outcome in outcomes.items() if outcome in ("stopped", "not started", "partial")]
    if left:
        print(
            f"{len(left)} run(s) unfinished ({runner.stop_reason or 'stopped'}); rerun the same command to "
            "continue them",
            flush=True,
        )


@contextlib.contextmanager
def stopping_runs_on_signals(runner: grid_runs.GridRunner):
    """SIGINT/SIGTERM to this command stop every run after its current step (each saves it); a second one
    ends them at once. Yields a list that holds the signal received, if any."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if not received:
            print(
                f"\n{name}: every run stops after its current step and saves it ({name} again ends them "
                "at once, without saving)",
                file=sys.stderr,
                flush=True,
            )
        received.append(signum)
        runner.stop(f"{name} received", grace_s=SIGNAL_GRACE_S)

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
                ax.errorbar(
                    i + offset,
                    grid.scale * stat["mean"],
                    yerr=grid.scale * stat["std"],
                    color="black",
                    marker=marker,
                    capsize=3,
                    ms=5,
                    label={final_key: "final (mean ± std)", best_key: "best on validation"}[key] if i == 0 else None,
                )
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel(grid.metric_label)
    ax.set_title(f"child {grid.metric_label} per seed")
    ax.legend(fontsize=8)
    ax = axes[1]
    for record in records:
        curve = record.get("validation_curve") or []
        if curve:
            steps, accs = zip(*curve)
            ax.plot(
                steps,
                [grid.scale * a for a in accs],
                color=colors[record["variant"]],
                alpha=0.6,
                label=record["variant"]
                if record["seed"] == min(r["seed"] for r in records if r["variant"] == record["variant"])
                else None,
            )
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
                ax.plot(
                    steps,
                    values,
                    color=colors[record["variant"]],
                    alpha=0.6,
                    label=label if label not in shown else None,
                )
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
        seeds = _seeds(args.seeds) if args.seeds else list(grid.seeds)
        unknown = [v for v in variants if v not in grid.variants] + [str(s) for s in seeds if s not in grid.seeds]
        if unknown:
            raise ValueError(
                f"not in grid {args.grid!r}: {', '.join(unknown)}; variants: {', '.join(grid.variants)}, "
                f"seeds: {grid.seeds}"
            )
        if args.time_budget is not None and args.time_budget <= 0:
            raise ValueError(f"--time_budget must be a positive number of minutes, got {args.time_budget}")
        runner = grid_runs.GridRunner(
            parallel=args.parallel,
            deadline=None if args.time_budget is None else time.monotonic() + 60 * args.time_budget,
            min_start_s=0.0 if args.time_budget is None else min(MIN_START_S, 60 * args.time_budget / 4),
        )
        root = Path(args.root or f"workdirs/compare_{args.grid}")
        _check_root(root, args)
        if args.parent_ckpt and not (args.dry_run or args.report_only):  # else every run would fail on it
            check_model_checkpoint(args.parent_ckpt, key="--parent_ckpt")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.parent_ckpt:
        grid = dataclasses.replace(grid, parent=None, common=(*grid.common, f"parent_ckpt={args.parent_ckpt}"))
    if args.dry_run:
        if grid.parent is not None:
            print(" ".join(comparison.parent_command(grid, root)))
        for seed in seeds:
            for variant in variants:
                print(" ".join(comparison.run_command(grid, root, variant, seed)))
        return 0
    signalled: list[int] = []
    try:
        if args.unpack:
            manifest = grid_pack.unpack(Path(args.unpack), root, args.grid)
            print(f"unpacked {args.unpack} into {root}: {grid_pack.describe(manifest)}", flush=True)
        if not args.report_only:
            with stopping_runs_on_signals(runner) as signalled:
                run_grid(grid, root, variants, seeds, runner)
    except grid_pack.PackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = [comparison.run_record(grid, root, v, s) for s in seeds for v in variants]
    table = comparison.aggregate(records, variants, comparison.report_keys(grid))
    out = Path(args.out or root / "report")
    markdown = comparison.markdown_table(table, grid)
    report = {"grid": args.grid, **comparison.grid_facts(records), "table": table, "runs": records}
    if grid.parent is not None:
        report["parent"] = comparison.parent_record(grid, root)
        markdown += comparison.parent_line(grid, report["parent"])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(f"# {args.grid}\n\n{grid.description}\n\n{markdown}")
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        plot_report(records, table, out.with_suffix(".png"), grid)
    except OSError as err:  # the runs are on disk: only the report's place is wrong
        reason = (
            f"{err.filename} is a file, not a folder"
            if isinstance(err, (FileExistsError, NotADirectoryError))
            else f"{err.strerror or err}: {err.filename}"
        )
        print(
            f"error: --out {out}: cannot write the report there ({reason}); choose another --out, then rerun "
            "with --report_only",
            file=sys.stderr,
        )
        return 2
    print(markdown)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    if args.pack:
        try:
            manifest = grid_pack.pack(
                args.grid, grid, root, Path(args.pack), variants, seeds, commit=comparison.current_commit()
            )
        except grid_pack.PackError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"packed {root} into {args.pack}: {grid_pack.describe(manifest)}")
    failed = sum(len(row["failed_seeds"]) for row in table)
    if signalled:
        return 128 + signalled[0]  # as a run stopped by a signal: everything saved, nothing failed
    return 1 if failed and not args.report_only else 0


if __name__ == "__main__":
    sys.exit(main())
