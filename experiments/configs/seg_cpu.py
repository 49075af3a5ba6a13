"""Segmentation at CPU scale (a 2-core machine, tens of minutes): synthetic CT, U-Net parent -> PocketNet child.

    python -m experiments.seg_hkt --config cpu --workdir workdirs/seg_cpu/hkt
    python -m experiments.seg_hkt --config cpu --workdir workdirs/seg_cpu/child method=child
    python -m experiments.seg_hkt --config cpu --workdir workdirs/seg_cpu/kd \
        --parent_ckpt workdirs/seg_cpu/hkt/parent/export/child method=kd

24 synthetic volumes in the LiTS layout (64x64 slices, 24 per volume; written
once into the data cache), split by volume: 16 train (384 slices), 4
validation, 4 test. Parent: UNet widths 16-32-64 (bottleneck 128; 482,483
parameters), trained first for 1,200 steps; child: PocketNet width 16, depth 3
(40,627 parameters), 960 steps (40
epochs of the training slices) for every method, so child / kd / hkt compare
at equal steps. HKT mixes the bottom features (8x8 = 64 tokens, spatial softmax
GA) after the encoder and the bottleneck; L1/L3 are the paper's MAE. SGD with
momentum, cosine decay; global batch 16 (a multiple of 8).
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.segmentation import SegDataConfig, SegSettings


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="segmentation",
        method="hkt",
        child=ModelConfig(arch="pocketnet", width=16, depth=3),
        parent=ModelConfig(arch="unet", widths=(16, 32, 64)),
        parent_epochs=50.0,  # 1,200 steps
        data=SegDataConfig(source="synthetic"),
        task_settings=SegSettings(synthetic_cases=24, synthetic_shape=(64, 64, 24), validation_cases=4, test_cases=4),
        optim=OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine"),
        hkt=HKTSettings(mode="softmax", inherit_loss="mae"),
        train=TrainSettings(
            batch_size=16, epochs=40.0, log_every_steps=24, eval_every_steps=120, checkpoint_every_steps=240
        ),
    )
