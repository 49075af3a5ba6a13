"""The paper's segmentation experiment (Table 3) on LiTS, for a GPU: DenseUNet parent -> PocketNet child, 3HKT.

    python -m experiments.seg_hkt --config lits --workdir workdirs/seg_lits data.path=/data/lits

``data.path``: the 131 labelled LiTS training volumes as ``volume-N.nii[.gz]`` /
``segmentation-N.nii[.gz]`` (labels 0 background, 1 liver, 2 tumour). Split by
volume (seeded, seg.split_seed): 92 train, 13 validation (best model by liver
Dice per case), 26 test. Slices: HU window [-200, 250] -> [0, 1], resized
512 -> 256, half of the training draws from slices with liver or tumour, random
flips and 90-degree rotations; stored as float16 (LiTS's volumes hold roughly
58k slices: about 8 GB of host memory at 256^2).

What the paper gives and what is chosen here. Paper: PocketNet child (0.8M
parameters), H-DenseUNet parent (80M, a 2D DenseNet-161 U-Net plus a 3D
branch), 3HKT (Algorithm 1), Dice per case / global on LiTS; it gives no
optimizer, schedule, epochs or slice size. Chosen here: the 2D ``DenseUNet``
(widths 64-128-256-512, 14.5M parameters; H-DenseUNet's 3D branch is left out)
as parent, ``PocketNet(width=32, depth=4)`` (2D, 0.21M parameters) as child;
mixing the bottom features after the encoder and after the bottleneck (16x16 =
256 tokens at 256^2 input, spatial softmax GA; ``hkt.stages=2`` mixes after the
bottleneck only); L1/L3 = the paper's MAE (``hkt.inherit_loss=ce`` uses CE + soft
Dice instead); alphas (0.25, 0.5, 0.25), lambda 0.6; the loss CE + soft Dice;
SGD momentum 0.9, lr 0.01, weight decay 1e-4 (H-DenseUNet's 2D training),
cosine decay over 20 epochs of ~41k training slices (batch 16: ~51k steps);
the parent likewise, first, in workdir/parent unless --parent_ckpt is given.
"""

from hkt_jax.training.config import ExperimentConfig, HKTSettings, ModelConfig, OptimConfig, TrainSettings
from hkt_jax.tasks.segmentation import SegDataConfig, SegSettings


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        task="segmentation",
        method="hkt",
        child=ModelConfig(arch="pocketnet", width=32, depth=4),
        parent=ModelConfig(arch="dense_unet", widths=(64, 128, 256, 512)),
        data=SegDataConfig(source="lits", name="lits", path="data/lits"),
        task_settings=SegSettings(
            window=(-200.0, 250.0),
            slice_size=256,
            validation_cases=13,
            test_cases=26,
            foreground_fraction=0.5,
            store_float16=True,
        ),
        optim=OptimConfig(learning_rate=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine"),
        hkt=HKTSettings(mode="softmax", lam=0.6, alphas=(0.25, 0.5, 0.25), inherit_loss="mae"),
        train=TrainSettings(
            batch_size=16, epochs=20.0, log_every_steps=100, eval_every_steps=2000, checkpoint_every_steps=2000
        ),
    )
