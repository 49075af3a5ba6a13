"""Table 3 at the paper's model sizes, for a GPU: an 84M-parameter DenseUNet parent -> a 0.84M PocketNet, 3HKT.

    python -m experiments.seg_hkt --config lits_paper --workdir workdirs/seg_lits_paper data.path=/data/lits

The same data, losses, HKT wiring and schedule as ``lits`` (see experiments/configs/seg_lits.py); only the
two networks grow to the sizes the paper reports (parent 80M, child 0.8M parameters):
- parent: the 2D ``DenseUNet`` with widths 160-320-640-1280 (84,233,003 parameters; ``lits`` uses
  64-128-256-512, 14.5M). The paper's H-DenseUNet is this 2D DenseNet U-Net plus a 3D DenseUNet branch
  on stacks of 12 adjacent slices whose features are fused with the 2D ones (its "hybrid feature
  fusion"): the 3D part would add inter-slice context and most of the training cost (3D convolutions
  over every stack); it is left out, so this parent sees one slice at a time like the child.
- child: ``PocketNet(width=64, depth=4)`` (2D, 843,011 parameters; ``lits`` uses width 32, 0.21M). The
  PocketNet paper's 0.8M network is 3D; a 2D PocketNet of about that size needs width 64.
At 256x256 slices and batch 16 the parent's forward pass is the bulk of an HKT step: plan for a GPU with
at least 40 GB (not yet run by this project).
"""

import dataclasses

from experiments.configs import seg_lits
from hkt_jax.training.config import ModelConfig


def get_config():
    lits = seg_lits.get_config()
    return dataclasses.replace(
        lits,
        child=ModelConfig(arch="pocketnet", width=64, depth=4),
        parent=ModelConfig(arch="dense_unet", widths=(160, 320, 640, 1280)),
    )
