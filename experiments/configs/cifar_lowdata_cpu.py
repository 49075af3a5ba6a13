"""Does HKT help when data is scarce? ResNet-20 on 5,000 CIFAR-10 images, a converted ResNet-56 parent (CPU).

    python -m hkt_jax.convert resnet --src ../shared/data/resnet-cifar10-torch/resnet56-4bfd9763.th \\
        --depth 56 --out workdirs/parents/resnet56
    python -m experiments.cifar_hkt --config cifar_lowdata_cpu --workdir workdirs/lowdata_hkt
    python -m experiments.compare --grid cifar_lowdata_cpu     # child, kd, hkt, reference, hkt_no_ga, hkt_kd x 3

Parent: the pretrained ResNet-56 converted from PyTorch (trained on all of CIFAR-10; 83.2 % on the
JPEG test split), frozen. Child: ResNet-20 from scratch on 500 training images per class
(``data.train_per_class=500``: a fixed subset, the same images for every variant and seed, drawn after
the usual 5,000-image validation hold-out), 60 epochs (2,340 steps of batch 128), SGD 0.1 / momentum 0.9 /
wd 1e-4 with a cosine schedule (1-epoch warm-up). Validation and test splits are unchanged. The method
settings are the paper's (2HKT after pooling, gate GA, lambda 0.6, MAE/CE/MAE, alphas 0.25/0.5/0.25).
Several hours on a 2-core CPU for the whole grid: run it with ``--time_budget`` and carry on later.
"""

import dataclasses

from experiments.configs import default
from hkt_jax.training.config import ExperimentConfig, ModelConfig, OptimConfig, TrainSettings


def get_config() -> ExperimentConfig:
    config = default.get_config()
    return dataclasses.replace(
        config,
        child=ModelConfig(depth=20),
        parent=ModelConfig(depth=56),
        parent_ckpt="workdirs/parents/resnet56",
        data=dataclasses.replace(config.data, train_per_class=500),
        optim=OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine", warmup_epochs=1.0),
        train=TrainSettings(
            batch_size=128, epochs=60.0, log_every_steps=39, eval_every_steps=195, checkpoint_every_steps=390
        ),
    )
