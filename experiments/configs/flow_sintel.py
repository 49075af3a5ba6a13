"""3HKT fine-tuning on MPI-Sintel training (clean + final), RAFT's sintel stage (one GPU).

    python -m experiments.flow_hkt --config sintel --workdir workdirs/flow_sintel \\
        data.path=/data/Sintel --parent_ckpt DIR_OF_A_SINTEL_PARENT \\
        init_ckpt=workdirs/flow_things/export/child

AdamW 1.25e-4 (weight decay 1e-5), one-cycle, clip 1.0, 100k steps of batch 6,
368x768 crops (Sintel augmentation), 12 iterations. Differences from RAFT: its
sintel stage mixes Sintel with Things, KITTI and HD1K and uses gamma 0.85; here
Sintel alone and gamma 0.8. 100 pairs (same indices in both passes) are held out
for selection and test; report the benchmark numbers with experiments.evaluate_flow.
Starts from the things run's export (``init_ckpt``), BatchNorm frozen, as RAFT.
"""

import dataclasses

from experiments.configs import flow_chairs
from hkt_jax.config import OptimConfig, TrainSettings


def get_config():
    config = flow_chairs.get_config()
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, source="sintel", path="data/Sintel", crop_size=(368, 768),
                                 validation_size=100),
        optim=OptimConfig(optimizer="adamw", learning_rate=1.25e-4, weight_decay=1e-5, schedule="one_cycle",
                          pct_start=0.05, clip_norm=1.0),
        init_ckpt="workdirs/flow_things/export/child",
        train=TrainSettings(batch_size=6, steps=100_000, log_every_steps=100, eval_every_steps=5000,
                            checkpoint_every_steps=5000, freeze_batch_norm=True),
    )
