"""Segmentation HKT experiment (paper Table 3): ``python -m experiments.seg_hkt [--config NAME]
[--workdir DIR] [--parent_ckpt DIR] [key=value ...]``.

The command line and training core shared with ``experiments.cifar_hkt``
(``hkt_jax.training.experiment_cli``) with the segmentation configs ``experiments/configs/seg_<NAME>.py``:
``smoke`` (synthetic CT, about a minute), ``cpu`` (synthetic, sized for a 2-core CPU)
and ``lits`` (the default: the paper-like LiTS run on a GPU, ``data.path=DIR``).
Without ``--parent_ckpt`` the parent U-Net is trained first in ``WORKDIR/parent``;
rerunning the same command resumes. Methods: ``method=child|parent|kd|hkt``; 3HKT
(``hkt.stages=3``, the default: after encoder and bottleneck) or 2HKT (``hkt.stages=2``).
Segment a volume with ``python -m experiments.segment_volume --model WORKDIR/export/child
VOLUME.nii.gz --out PRED.nii.gz [--gt SEG.nii.gz]``.
"""

from __future__ import annotations

import sys

from hkt_jax.training import experiment_cli

COMMAND = experiment_cli.Command("python -m experiments.seg_hkt", __doc__, config_prefix="seg_", default_config="lits")


def main(argv=None) -> int:
    return experiment_cli.main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
