"""A stand-in run for the scheduler tests: sleeps ``sleep=S`` seconds, then writes its summary; SIGTERM makes it
save a "checkpoint" and exit 143 (as a real run does), and a rerun with that checkpoint finishes at once.
Every start and end is appended to ``ROOT/events.txt`` (to count runs at once), with its memory share."""

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv):
    workdir = Path(argv[argv.index("--workdir") + 1])
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("--"))
    workdir.mkdir(parents=True, exist_ok=True)
    events = workdir.parent.parent / "events.txt"
    share = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "-")

    def log(event):
        with open(events, "a") as out:
            out.write(f"{time.time():.3f} {event} {workdir.parent.name}/{workdir.name} {share}\n")

    def stop(signum, frame):
        (workdir / "checkpoint").write_text("stopped")
        log("stop")
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    log("start")
    if not (workdir / "checkpoint").exists():
        time.sleep(float(overrides.get("sleep", 0)))
    seed = int(overrides["train.seed"])
    (workdir / "summary.json").write_text(
        json.dumps({"final_test_accuracy": 0.5 + 0.01 * seed, "best_test_accuracy": 0.5 + 0.01 * seed})
    )
    log("end")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
