"""3HKT on FlyingThings3D (RAFT's second stage; one GPU).

    python -m experiments.flow_hkt --config things --workdir workdirs/flow_things \\
        data.path=/data/FlyingThings3D --parent_ckpt DIR_OF_A_THINGS_PARENT \\
        init_ckpt=workdirs/flow_chairs/export/child

RAFT's things schedule: AdamW 1.25e-4 (weight decay 1e-4), one-cycle, clip 1.0,
100k steps of batch 6, 400x720 crops (Things augmentation), clean + final
passes, 12 iterations. As RAFT's chain, the trained network starts from the
chairs run's export (``init_ckpt``; ``init_ckpt=none`` starts fresh) and its
BatchNorm is frozen (``train.freeze_batch_norm``: RAFT-S has none, RAFT's
context encoder has: it matters when a RAFT parent is trained with ``method=parent``).
"""

import dataclasses

from experiments.configs import flow_chairs
from hkt_jax.config import OptimConfig, TrainSettings


def get_config():
    config = flow_chairs.get_config()
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, source="things", path="data/FlyingThings3D", crop_size=(400, 720),
                                 validation_size=400),
        optim=OptimConfig(optimizer="adamw", learning_rate=1.25e-4, weight_decay=1e-4, schedule="one_cycle",
                          pct_start=0.05, clip_norm=1.0),
        init_ckpt="workdirs/flow_chairs/export/child",
        train=TrainSettings(batch_size=6, steps=100_000, log_every_steps=100, eval_every_steps=5000,
                            checkpoint_every_steps=5000, freeze_batch_norm=True),
    )
