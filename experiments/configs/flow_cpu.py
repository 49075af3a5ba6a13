"""3HKT RAFT -> RAFT-S on synthetic flow, sized for a 2-core CPU (the CPU-scale comparison in docs/results.md).

    python -m experiments.flow_hkt --config cpu --workdir workdirs/flow_cpu

The paper's pair (RAFT parent, RAFT-S child) on 96x96 synthetic pairs cropped to
64x64 with RAFT's Chairs augmentation (eraser scaled to the crop), 4 iterations,
2,048 training / 64 validation / 128 test pairs, global batch 8. The parent is
trained first (workdir/parent, 3 epochs = 768 steps), then the child (2 epochs
= 512 steps); compare methods on one parent: ``method=child``,
``method=kd``, ``hkt.stages=2`` with ``--parent_ckpt WORKDIR/parent/export/child``,
or all at once: ``python -m experiments.compare --grid flow_cpu``. AdamW 4e-4,
one-cycle, clip 1.0. Sized for the time a 2-core CPU has: far too short to
train RAFT well.
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, KDSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.flow_data import FlowDataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="flow",
        method="hkt",
        child=ModelConfig(arch="raft", small=True),
        parent=ModelConfig(arch="raft", small=False),
        data=FlowDataConfig(
            source="synthetic",
            frame_size=(96, 96),
            crop_size=(64, 64),
            augment=True,
            synthetic_train_size=2048,
            validation_size=64,
            synthetic_test_size=128,
            iters=4,
        ),
        optim=OptimConfig(
            optimizer="adamw",
            learning_rate=4e-4,
            weight_decay=1e-4,
            schedule="one_cycle",
            pct_start=0.05,
            clip_norm=1.0,
        ),
        hkt=HKTSettings(inherit_loss="seq", stages=3),
        kd=KDSettings(weight=0.5),
        parent_epochs=3.0,
        train=TrainSettings(
            batch_size=8, epochs=2.0, log_every_steps=32, eval_every_steps=128, checkpoint_every_steps=128
        ),
    )
