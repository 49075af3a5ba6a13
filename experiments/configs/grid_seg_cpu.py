"""3HKT vs KD vs the child alone on synthetic CT segmentation at CPU scale (one U-Net parent, `seg_cpu`).

    python -m experiments.compare --grid seg_cpu --out experiments/results/compare_seg_cpu

A U-Net (widths 16-32-64, 482k parameters) is trained first in ROOT/parent
(1,200 steps); every variant then trains a fresh PocketNet (width 16, depth 3,
41k parameters) for 960 steps of batch 16 against that frozen parent:
- child: PocketNet alone (cross-entropy + soft Dice);
- kd: half segmentation loss, half pixel-wise KD on the parent's logits;
- hkt: the paper's 3HKT (bottom features mixed after encoder and bottleneck, spatial softmax GA).
Liver Dice per case (model selection) and global Dice (the paper's D-Mean) on 4 held-out synthetic
volumes, higher is better.
"""

from hkt_jax.grids.comparison import Grid

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
    # The paper's Table 3 reports global Dice (D-Mean: 2 sum|P n G| / sum(|P| + |G|) over all test cases), on
    # LiTS with its own networks: shown beside ours, not comparable in absolute terms.
    extra_metrics=(("dice_global/liver", "test liver Dice global (D-Mean) %"),),
    paper={"child": "93.0 (PocketNet, LiTS D-Mean)", "hkt": "94.1 (HKT, LiTS D-Mean)"},
    description="U-Net parent (trained here, frozen) -> PocketNet child on 24 synthetic CT volumes (64x64 slices), "
    "960 steps of batch 16 per child; liver Dice per case on 4 held-out volumes (higher is better).",
)
