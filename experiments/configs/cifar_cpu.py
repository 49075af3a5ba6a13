"""CIFAR-10 sized for a 2-core CPU: the base of the seeds x variants comparison.

    python -m hkt_jax.convert resnet --src ../shared/data/resnet-cifar10-torch/resnet56-4bfd9763.th \
        --depth 56 --out workdirs/parents/resnet56
    python -m experiments.cifar_hkt --config cifar_cpu --parent_ckpt workdirs/parents/resnet56

Parent: the pretrained ResNet-56 converted from PyTorch (83.2 % on the JPEG test
split), frozen. Child: ResNet-8 (75k parameters) trained from scratch for one
epoch on the JPEG-q75 CIFAR-10 (45,000 train images, the fixed 5,000-image
validation split for model selection, the 10,000 test images for reporting).
SGD 0.1 / momentum 0.9 / wd 1e-4 with a cosine schedule (0.1-epoch warm-up),
batch 128; the method settings are the paper's (2HKT after pooling, gate GA,
lambda 0.6, MAE/CE/MAE, alphas 0.25/0.5/0.25). Accuracies at this length are far
below the paper's 200-epoch numbers: the point is the comparison between variants.
"""

import dataclasses

from experiments.configs import default
from hkt_jax.training.config import ExperimentConfig, ModelConfig, OptimConfig, TrainSettings


def get_config() -> ExperimentConfig:
    config = default.get_config()
    return dataclasses.replace(
        config,
        child=ModelConfig(depth=8),
        parent=ModelConfig(depth=56),
        parent_ckpt="workdirs/parents/resnet56",
        optim=OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine", warmup_epochs=0.1),
        train=TrainSettings(
            batch_size=128, epochs=1.0, log_every_steps=25, eval_every_steps=100, checkpoint_every_steps=100
        ),
    )
