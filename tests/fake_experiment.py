"""A stand-in experiment for the comparison tests: writes a summary whose accuracy encodes its seed,
or fails when asked (``fail=1``), like ``python -m experiments.cifar_hkt`` would leave a run."""

import json
import sys
from pathlib import Path


def main(argv):
    workdir = Path(argv[argv.index("--workdir") + 1])
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "calls.txt", "a") as calls:
        calls.write(" ".join(argv) + "\n")
    if overrides.get("fail") == "1":
        print("boom: this run was told to fail", file=sys.stderr)
        return 3
    seed, bonus = int(overrides["train.seed"]), float(overrides.get("bonus", 0))
    epe = 2.0 - bonus + 0.1 * seed  # a lower-is-better number for grids with metric="epe"
    rows = [
        {"step": 10, "loss": 1.0, "img_per_s": 100.0 + seed, "gate/to_child_0": 0.99},
        {"step": 10, "eval_accuracy": 0.5 + bonus, "eval_epe": epe, "split": "validation"},
    ]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "config.json").write_text(json.dumps({"overrides": overrides}))
    accuracy = 0.5 + bonus + 0.01 * seed
    (workdir / "summary.json").write_text(
        json.dumps(
            {
                "final_test_accuracy": accuracy,
                "best_test_accuracy": accuracy + 0.001,
                "parameters": 1234,
                "final_test_epe": epe,
                "best_test_epe": epe - 0.05,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
