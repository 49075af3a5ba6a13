"""The authors' released CIFAR code, reproduced (without its defects).

    python -m experiments.cifar_hkt --config reference [--parent_ckpt DIR]

As released: one inheritance point after global average pooling, gate-form GA,
lambda = 0.6, cross-entropy for all three losses with equal weights, SGD lr
0.01, momentum 0.9, wd 1e-4, batch 128, x0.1 at epochs 100/150 (200 epochs),
ImageNet mean/std normalisation, pad-4 crop + flip. Not copied: their parent
runs in train-mode BatchNorm without no_grad (ours is frozen in inference
mode), and they picked the best epoch on the test set (we select on a held-out
validation split and report final and best).
"""

import dataclasses

from experiments.configs import default
from hkt_jax.config import ExperimentConfig, HKTSettings, OptimConfig


def get_config() -> ExperimentConfig:
    config = default.get_config()
    return dataclasses.replace(
        config,
        optim=OptimConfig(learning_rate=0.01, momentum=0.9, weight_decay=1e-4, schedule="multistep",
                          milestones=(100.0, 150.0)),
        hkt=HKTSettings(lam=0.6, mode="gate", alphas=(1 / 3, 1 / 3, 1 / 3), inherit_loss="ce", stage_split="paper"),
    )
