"""Smoke run: tiny ResNets on synthetic data, seconds on a laptop CPU.

    python -m experiments.cifar_hkt --config smoke --workdir /tmp/hkt_smoke

Trains a ResNet-14 parent for a few steps, then 2HKT into a ResNet-8 child.
The global batch (32) is a multiple of 8, so the same command runs unchanged
on 1 or 8 (simulated) devices.
"""

from hkt_jax.training.config import ExperimentConfig, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.data import DataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        method="hkt",
        child=ModelConfig(depth=8),
        parent=ModelConfig(depth=14),
        data=DataConfig(source="synthetic", validation_size=256, synthetic_train_size=1024, synthetic_test_size=256),
        optim=OptimConfig(learning_rate=0.05, schedule="cosine", warmup_epochs=0.5),
        train=TrainSettings(
            batch_size=32, steps=40, log_every_steps=10, eval_every_steps=20, checkpoint_every_steps=20
        ),
    )
