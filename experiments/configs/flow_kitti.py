"""3HKT fine-tuning on KITTI-2015 training, RAFT's kitti stage (one GPU; starts from the sintel run).

    python -m experiments.flow_hkt --config kitti --workdir workdirs/flow_kitti \\
        data.path=/data/KITTI --parent_ckpt DIR_OF_A_KITTI_PARENT \\
        init_ckpt=workdirs/flow_sintel/export/child

Copied from RAFT's kitti stage: AdamW 1e-4 (weight decay 1e-5), one-cycle, clip 1.0, 50k
steps of batch 6, 288x960 crops with RAFT's sparse KITTI augmentation (no flips), 12
iterations, sequence loss gamma 0.85, starting from the **sintel** run's export
(``init_ckpt``) with frozen BatchNorm. Not as RAFT: 40 of the 200 pairs are held out for
selection and test (RAFT fine-tunes on all 200 for its benchmark submission).
"""

import dataclasses

from experiments.configs import flow_sintel


def get_config():
    sintel = flow_sintel.get_config()
    return dataclasses.replace(
        sintel,
        data=dataclasses.replace(
            sintel.data, source="kitti", path="data/KITTI", crop_size=(288, 960), validation_size=40
        ),
        optim=dataclasses.replace(sintel.optim, learning_rate=1e-4),
        init_ckpt="workdirs/flow_sintel/export/child",
        train=dataclasses.replace(sintel.train, steps=50_000),
    )
