"""Segmentation smoke run (seconds on a CPU): synthetic CT volumes, tiny U-Net parent -> PocketNet child.

    python -m experiments.seg_hkt --config smoke --workdir /tmp/hkt_seg_smoke

Four synthetic volumes in the LiTS layout (32x32 slices, 16 per volume; written
once into the data cache): 2 train, 1 validation, 1 test, split by volume. The
parent (UNet widths 8-16, 29,499 parameters) is trained first in workdir/parent
(100 steps), then 3-stage HKT into a PocketNet (width 8, depth 2, 7,123 parameters;
80 steps): the bottom features are mixed after the encoder and after the
bottleneck (spatial softmax GA over 8x8 = 64 tokens). Constant learning rate, so a rerun to more
steps continues exactly where a shorter one stopped. Global batch 8: the same
command runs on 1 or 8 (simulated) devices.
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.segmentation import SegDataConfig, SegSettings


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="segmentation",
        method="hkt",
        child=ModelConfig(arch="pocketnet", width=8, depth=2),
        parent=ModelConfig(arch="unet", widths=(8, 16)),
        data=SegDataConfig(source="synthetic"),
        task_settings=SegSettings(synthetic_cases=4, synthetic_shape=(32, 32, 16), validation_cases=1, test_cases=1),
        parent_epochs=25.0,  # 100 steps: the parent must be worth inheriting from
        optim=OptimConfig(learning_rate=0.1, schedule="constant", weight_decay=0.0),
        hkt=HKTSettings(mode="softmax", alphas=(0.25, 0.5, 0.25), inherit_loss="mae"),
        train=TrainSettings(
            batch_size=8, epochs=20.0, log_every_steps=4, eval_every_steps=40, checkpoint_every_steps=40
        ),
    )
