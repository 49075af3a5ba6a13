"""Optical-flow HKT experiment (paper Table 1): ``python -m experiments.flow_hkt [--config NAME]
[--workdir DIR] [--parent_ckpt DIR] [key=value ...]``.

The command line and training core shared with ``experiments.cifar_hkt``
(``hkt_jax.training.experiment_cli``) with the flow configs ``experiments/configs/flow_<NAME>.py``: ``smoke``
(synthetic, a few CPU-minutes), ``cpu`` (synthetic, sized for a 2-core CPU), and the
paper's GPU schedule ``chairs`` (the default) -> ``things`` -> ``sintel`` / ``kitti``.
Without ``--parent_ckpt`` the parent RAFT is trained first in ``WORKDIR/parent``
(or give a converted one: ``python -m hkt_jax.convert raft --src raft-things.pth --out DIR``);
rerunning the same command resumes. Methods: ``method=child|parent|kd|hkt``; 3HKT
(``hkt.stages=3``, the default) or 2HKT (``hkt.stages=2``). Evaluate with
``python -m experiments.evaluate_flow --model WORKDIR/export/child --dataset sintel --path P``.
"""

from __future__ import annotations

import sys

from hkt_jax.training import experiment_cli

COMMAND = experiment_cli.Command(
    "python -m experiments.flow_hkt", __doc__, config_prefix="flow_", default_config="chairs"
)


def main(argv=None) -> int:
    return experiment_cli.main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
