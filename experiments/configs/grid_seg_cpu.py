"""3HKT vs KD vs the child alone on synthetic CT segmentation at CPU scale (one U-Net parent, `seg_cpu`).

    python -m experiments.compare --grid seg_cpu --out experiments/results/compare_seg_cpu

A U-Net (widths 16-32-64, 482k parameters) is trained first in ROOT/parent
(1,200 steps); every variant then trains a fresh PocketNet (width 16, depth 3,
41k parameters) for 960 steps of batch 16 against that frozen parent:
- child: PocketNet alone (cross-entropy + soft Dice);
- kd: half segmentation loss, half pixel-wise KD on the parent's logits;
- hkt: the paper's 3HKT (bottom features mixed after encoder and bottleneck, spatial softmax GA).
Liver Dice per case on 4 held-out synthetic volumes, higher is better.
"""

from hkt_jax.comparison import Grid

GRID = Grid(
    experiment="experiments.seg_hkt",
    config="cpu",
    seeds=(0, 1, 2),
    parent=(),
    variants={
        "child": ("method=child",),
        "kd": ("method=kd",),
        "hkt": ("method=hkt",),
    },
    metric="dice",
    metric_label="test liver Dice per case %",
    description="U-Net parent (trained here, frozen) -> PocketNet child on 24 synthetic CT volumes (64x64 slices), "
                "960 steps of batch 16 per child; liver Dice per case on 4 held-out volumes (higher is better).",
)
