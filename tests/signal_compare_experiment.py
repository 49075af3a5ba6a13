"""``experiments.cifar_hkt``, plus: once the run named by ``HKT_TEST_SIGNAL_COMPARE_AT`` ("VARIANT/seedK:STEP")
has done STEP steps, it sends SIGTERM to the process that launched it (``experiments.compare``), as the end
of a slot would, and holds that step until compare's forwarded SIGTERM reaches it: the run then stops at
exactly that step, whatever the machine's load."""

import os
import signal
import sys
import time
from pathlib import Path

from experiments import cifar_hkt
from hkt_jax.training import hooks

ENV = "HKT_TEST_SIGNAL_COMPARE_AT"


def main(argv):
    target = os.environ.get(ENV)
    workdir = Path(argv[argv.index("--workdir") + 1])
    if target:
        name, step = target.rsplit(":", 1)
        if workdir.as_posix().endswith(name):
            original = hooks.Progress.__call__

            def call(self, done, state, metrics):
                if done == int(step):
                    os.kill(os.getppid(), signal.SIGTERM)
                    deadline = time.monotonic() + 120
                    # StopOnSignal resets the handlers to the default once it has the signal.
                    while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL and time.monotonic() < deadline:
                        time.sleep(0.05)
                return original(self, done, state, metrics)

            hooks.Progress.__call__ = call
    return cifar_hkt.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
