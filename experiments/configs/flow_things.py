"""3HKT on FlyingThings3D, RAFT's things stage (one GPU; starts from the chairs run).

    python -m experiments.flow_hkt --config things --workdir workdirs/flow_things \\
        data.path=/data/FlyingThings3D --parent_ckpt DIR_OF_A_THINGS_PARENT \\
        init_ckpt=workdirs/flow_chairs/export/child

Copied from RAFT's things stage: AdamW 1.25e-4 (weight decay 1e-4), one-cycle, clip 1.0,
100k steps of batch 6, 400x720 crops with RAFT's Things augmentation, clean + final
passes, 12 iterations, gamma 0.8, starting from the chairs run's export (``init_ckpt``;
``init_ckpt=none`` starts fresh) with frozen BatchNorm (``train.freeze_batch_norm``:
RAFT-S has none, RAFT's context encoder has: it matters when a RAFT parent is trained
with ``method=parent``). Not as RAFT: it validates on Sintel; here 400 Things pairs
are held out for selection and test.
"""

import dataclasses

from experiments.configs import flow_chairs


def get_config():
    chairs = flow_chairs.get_config()
    return dataclasses.replace(
        chairs,
        data=dataclasses.replace(
            chairs.data, source="things", path="data/FlyingThings3D", crop_size=(400, 720), validation_size=400
        ),
        optim=dataclasses.replace(chairs.optim, learning_rate=1.25e-4),
        init_ckpt="workdirs/flow_chairs/export/child",
        train=dataclasses.replace(chairs.train, batch_size=6, freeze_batch_norm=True),
    )
