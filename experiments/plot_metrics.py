"""Plot training curves of one or more runs: ``python -m experiments.plot_metrics WORKDIR... [--out FILE.png]``.

Reads each run's ``metrics.jsonl`` and draws, side by side: training loss,
the three HKT loss terms (l1, l2, l3), and validation accuracy - so a
baseline, a KD run and an HKT run can be compared at a glance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend first)

from hkt_jax.metrics import read_metrics  # noqa: E402


def _series(rows, key):
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(workdirs, out: Path) -> Path:
    fig, (ax_loss, ax_terms, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    for workdir in workdirs:
        rows = read_metrics(workdir)
        if not rows:
            raise ValueError(f"{workdir}: no metrics.jsonl rows (is it a training run's workdir?)")
        label = Path(workdir).name or str(workdir)
        ax_loss.plot(*_series(rows, "loss"), label=label)
        for term, style in (("l1", ":"), ("l2", "-"), ("l3", "--")):
            ax_terms.plot(*_series(rows, term), style, label=f"{label} {term}")
        ax_acc.plot(*_series(rows, "eval_accuracy"), marker="o", label=label)
    for ax, title in ((ax_loss, "training loss"), (ax_terms, "L1 (backbone) / L2 (native) / L3 (head)"),
                      (ax_acc, "validation accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Write ``fig`` as a PNG (creating its folder) and free it; the experiments' one way to save a plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default="metrics.png", help="output PNG (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = plot_runs(args.workdirs, Path(args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
