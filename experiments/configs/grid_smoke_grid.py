"""A tiny grid for trying `experiments.compare`'s slot flags (--parallel, --time_budget, --pack, --unpack).

    python -m experiments.compare --grid smoke_grid --root /tmp/smoke_grid --parallel 2 --time_budget 0.5 \
        --pack /tmp/smoke_pack
    python -m experiments.compare --grid smoke_grid --root /tmp/smoke_grid_next --unpack /tmp/smoke_pack

The `smoke` config (synthetic CIFAR-shaped data): a ResNet-14 parent trained first in ROOT/parent, then
KD and 2HKT into a ResNet-8 child, 2 seeds; 16 steps of batch 32 each, a checkpoint every 8.
About 2 minutes of CPU time in all (mostly start-up and compilation), less with --parallel 2.
"""

from hkt_jax.grids.comparison import Grid

GRID = Grid(
    experiment="experiments.cifar_hkt",
    config="smoke",
    seeds=(0, 1),
    parent=(),
    common=("train.steps=16", "train.log_every_steps=4", "train.eval_every_steps=8", "train.checkpoint_every_steps=8"),
    variants={
        "kd": ("method=kd",),
        "hkt": ("method=hkt",),
    },
    description="ResNet-14 parent (trained here, 16 steps) -> ResNet-8 child on synthetic CIFAR-shaped data, "
    "16 steps of batch 32; a smoke test of the grid machinery, not a result.",
)
