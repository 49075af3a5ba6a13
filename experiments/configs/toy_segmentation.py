"""A toy per-pixel task through the same training core as CIFAR (seconds on a CPU).

    python -m experiments.cifar_hkt --config toy_segmentation --workdir /tmp/hkt_toy_seg

Which pixels of a noisy 16x16 image belong to its brighter square: a small
per-pixel parent (widths 16/32) is trained first, then 3-stage HKT into a
narrower child (widths 4/8) with Transfer adapters and softmax GA over the
256 pixel tokens. It shows the loop, HKT, checkpoints and sharding are not
tied to classification (``hkt_jax.tasks.ToySegmentation``).
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.data import DataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="toy_segmentation",
        method="hkt",
        child=ModelConfig(arch="toy", widths=(4, 8), strides=(1, 1), per_pixel=True),
        parent=ModelConfig(arch="toy", widths=(16, 32), strides=(1, 1), per_pixel=True),
        data=DataConfig(source="synthetic", validation_size=64, synthetic_train_size=256, synthetic_test_size=64),
        optim=OptimConfig(learning_rate=0.05, schedule="constant", weight_decay=0.0),
        hkt=HKTSettings(mode="softmax"),
        train=TrainSettings(batch_size=16, steps=16, log_every_steps=4, eval_every_steps=8, checkpoint_every_steps=8),
    )
