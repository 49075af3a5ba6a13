"""3HKT RAFT -> RAFT-S on FlyingChairs, RAFT's chairs schedule (one GPU; the paper's Table 1 first stage).

    python -m experiments.flow_hkt --config chairs --workdir workdirs/flow_chairs \\
        data.path=/data/FlyingChairs_release [--parent_ckpt DIR]

Copied from RAFT (``train_standard.sh``, ``core/datasets.py``, ``train.py``): AdamW
4e-4 (weight decay 1e-4, eps 1e-8), one-cycle (5 % warm-up, linear anneal, over
steps + 100), gradient clipping at norm 1.0, 100k steps of global batch 12,
368x496 crops with RAFT's Chairs augmentation, 12 iterations, sequence loss gamma
0.8. Not as RAFT: 200 training pairs are held out for model selection (RAFT
selects nothing), and the HKT machinery below is the paper's. 3HKT: both frames' features mixed after ``features``, hidden state
and context after ``context`` (softmax GA over the 46x62 = 2,852 tokens at 1/8
resolution: the chunked kernel, ``hkt.impl=auto``); L1 / L3 are sequence losses
of the backbone and head streams (``hkt.inherit_loss=seq``). 200 Chairs training
pairs are held out for model selection; test = the official Chairs validation
split. Without ``--parent_ckpt`` a RAFT parent is first trained the same way.
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.flow_data import FlowDataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="flow",
        method="hkt",
        child=ModelConfig(arch="raft", small=True),
        parent=ModelConfig(arch="raft", small=False),
        data=FlowDataConfig(
            source="chairs", path="data/FlyingChairs_release", crop_size=(368, 496), validation_size=200, iters=12
        ),
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=4e-4,
            weight_decay=1e-4,
            adam_eps=1e-8,
            schedule="one_cycle",
            pct_start=0.05,
            clip_norm=1.0,
        ),
        hkt=HKTSettings(inherit_loss="seq", stages=3),
        train=TrainSettings(
            batch_size=12, steps=100_000, log_every_steps=100, eval_every_steps=5000, checkpoint_every_steps=5000
        ),
    )
