"""The full Table 2 reproduction (GPU): the same variants on the paper's `default` config, 3 seeds.

    python -m experiments.cifar_hkt --config default method=parent --workdir workdirs/parent110   # or convert one
    python -m experiments.compare --grid cifar_paper --out experiments/results/compare_cifar_paper

ResNet-110 parent -> ResNet-20 child, 200 epochs each (see experiments/configs/default.py); the parent
checkpoint is `workdirs/parent110/export/child` (pass another with `parent_ckpt=...` in `common`).
"""

from experiments.configs.grid_cifar_cpu import GRID as CPU_GRID
from hkt_jax.comparison import Grid

GRID = Grid(
    experiment="experiments.cifar_hkt",
    config="default",
    seeds=(0, 1, 2),
    common=("parent_ckpt=workdirs/parent110/export/child",),
    variants={**CPU_GRID.variants, "reference": ("method=hkt", "hkt.mode=gate", "hkt.inherit_loss=ce",
                                                 "hkt.alphas=0.3333333333,0.3333333334,0.3333333333",
                                                 "optim.learning_rate=0.01")},
    description="ResNet-110 parent -> ResNet-20 child, the paper's 200-epoch schedule.",
)
