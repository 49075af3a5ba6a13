"""The paper's CIFAR-10 setting (Table 2): 2HKT, ResNet-110 parent -> ResNet-20 child.

    python -m experiments.cifar_hkt                       # trains the parent first, then the child
    python -m experiments.cifar_hkt --parent_ckpt DIR     # with a pretrained/converted parent

Paper: one inheritance point after global average pooling (2 stages), GA
mixing (gate form on pooled vectors, lambda = 0.6), MAE for the inherited
losses L1/L3 (Eq. 5, 8), cross-entropy for L2; alphas (0.25, 0.5, 0.25)
(the paper gives only the constraints). Optimisation is the standard CIFAR
ResNet recipe (SGD 0.1, momentum 0.9, wd 1e-4, batch 128, 200 epochs,
x0.1 at epochs 100 and 150). Model selection on a 5,000-image validation split.

Low-rate warm-up (``optim.low_lr_warmup_steps=400``): a ResNet-110 trained here (the parent, when
no ``parent_ckpt`` is given, or ``method=parent``) runs its first 400 steps at lr 0.01, then 0.1, as
He et al. (2016, Sec. 4.2) train it; from 0.1 at step 0 it can sit at chance. The ResNet-20 child
keeps the plain schedule (the warm-up applies to CIFAR ResNets of depth >= 110 only).
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.data import DataConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        method="hkt",
        child=ModelConfig(depth=20),
        parent=ModelConfig(depth=110),
        data=DataConfig(source="auto", name="cifar10", validation_size=5000),
        optim=OptimConfig(
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            schedule="multistep",
            milestones=(100.0, 150.0),
            low_lr_warmup_steps=400,
        ),
        hkt=HKTSettings(lam=0.6, mode="auto", alphas=(0.25, 0.5, 0.25), inherit_loss="mae", stage_split="paper"),
        train=TrainSettings(batch_size=128, epochs=200.0, log_every_steps=50, checkpoint_every_steps=1000),
    )
