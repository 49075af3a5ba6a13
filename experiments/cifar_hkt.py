"""CIFAR HKT experiment: ``python -m experiments.cifar_hkt [--config NAME] [--workdir DIR] [key=value ...]``.

Configs live in ``experiments/configs`` (default: the paper's setting, reference: the authors'
released code, smoke: seconds on a CPU). The command line is the library's
(``hkt_jax.training.experiment_cli``), shared with ``experiments.flow_hkt`` and ``experiments.seg_hkt``.
"""

from __future__ import annotations

import sys

from hkt_jax.training import experiment_cli

COMMAND = experiment_cli.Command("python -m experiments.cifar_hkt", __doc__)


def main(argv=None) -> int:
    return experiment_cli.main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
