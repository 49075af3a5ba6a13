"""3HKT fine-tuning on KITTI-2015 training, RAFT's kitti stage (one GPU).

    python -m experiments.flow_hkt --config kitti --workdir workdirs/flow_kitti \\
        data.path=/data/KITTI --parent_ckpt DIR_OF_A_KITTI_PARENT \\
        init_ckpt=workdirs/flow_things/export/child

AdamW 1e-4 (weight decay 1e-5), one-cycle, clip 1.0, 50k steps of batch 6,
288x960 crops with RAFT's sparse KITTI augmentation, 12 iterations (RAFT: gamma
0.85; here 0.8). 40 of the 200 pairs are held out for selection and test.
Starts from the things run's export (``init_ckpt``), BatchNorm frozen, as RAFT.
"""

import dataclasses

from experiments.configs import flow_chairs
from hkt_jax.config import OptimConfig, TrainSettings


def get_config():
    config = flow_chairs.get_config()
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, source="kitti", path="data/KITTI", crop_size=(288, 960),
                                 validation_size=40),
        optim=OptimConfig(optimizer="adamw", learning_rate=1e-4, weight_decay=1e-5, schedule="one_cycle",
                          pct_start=0.05, clip_norm=1.0),
        init_ckpt="workdirs/flow_things/export/child",
        train=TrainSettings(batch_size=6, steps=50_000, log_every_steps=100, eval_every_steps=5000,
                            checkpoint_every_steps=5000, freeze_batch_norm=True),
    )
