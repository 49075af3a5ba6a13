"""3HKT vs 2HKT vs KD vs the child alone on optical flow at CPU scale (one RAFT parent, `flow_cpu` config).

    python -m experiments.compare --grid flow_cpu --out experiments/results/compare_flow_cpu

RAFT (4.8M parameters) is trained first from scratch in ROOT/parent (768 steps of
batch 8 on 64x64 synthetic crops); then every variant trains a fresh RAFT-S
child for 512 steps against that frozen parent:
- child: RAFT-S alone (sequence loss);
- kd: the DRAFT-style baseline, half sequence loss vs ground truth, half vs the parent's final flow;
- hkt3: the paper's 3HKT (features mixed after `features`, hidden state and context after `context`);
- hkt2: 2HKT (all four mixed once, after the encoders).
Test EPE on 128 held-out synthetic pairs, lower is better.
"""

from hkt_jax.grids.comparison import Grid

GRID = Grid(
    experiment="experiments.flow_hkt",
    config="cpu",
    seeds=(0, 1),
    parent=(),
    variants={
        "child": ("method=child",),
        "kd": ("method=kd",),
        "hkt3": ("method=hkt", "hkt.stages=3"),
        "hkt2": ("method=hkt", "hkt.stages=2"),
    },
    metric="epe",
    metric_label="test EPE (px)",
    scale=1.0,
    description="RAFT parent (trained here, frozen) -> RAFT-S child on synthetic flow, 64x64 crops, 4 iterations, "
    "512 steps of batch 8 per child; end-point error on 128 held-out synthetic pairs (lower is better).",
)
