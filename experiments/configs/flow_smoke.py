"""Optical-flow smoke run: synthetic pairs, RAFT-S parent -> RAFT-S child (8 + 8 steps, mostly compilation).

    python -m experiments.flow_hkt --config smoke --workdir /tmp/hkt_flow_smoke

64x64 synthetic pairs (textured shapes under affine motions, exact flow), 2
refinement iterations. The parent (RAFT-S from scratch) is trained first in
workdir/parent, then 3HKT into a fresh RAFT-S child: both frames' features mixed
after ``features``, hidden state and context after ``context`` (softmax GA over
the 8x8 = 64 tokens of 1/8 resolution), three sequence losses. AdamW with
a constant rate and clipping, so a rerun to more steps continues exactly where a
shorter one stopped. Global batch 8: the same command runs on 1 or 8
(simulated) devices. Swap in the paper's pair with ``parent.small=false``.
Measured: 99 s wall (125 s user time) for the whole job, mostly compilation, on an
idle 2-core AMD EPYC Zen 5.
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.flow_data import FlowDataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="flow",
        method="hkt",
        child=ModelConfig(arch="raft", small=True),
        parent=ModelConfig(arch="raft", small=True),
        data=FlowDataConfig(
            source="synthetic",
            frame_size=(64, 64),
            crop_size=(64, 64),
            augment=False,
            synthetic_train_size=64,
            validation_size=8,
            synthetic_test_size=8,
            iters=2,
        ),
        optim=OptimConfig(optimizer="adamw", learning_rate=4e-4, weight_decay=1e-4, schedule="constant", clip_norm=1.0),
        hkt=HKTSettings(inherit_loss="seq", stages=3),
        train=TrainSettings(batch_size=8, steps=8, log_every_steps=4, eval_every_steps=4, checkpoint_every_steps=4),
    )
