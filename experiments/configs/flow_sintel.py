"""3HKT fine-tuning on MPI-Sintel training (clean + final), RAFT's sintel stage (one GPU; starts from things).

    python -m experiments.flow_hkt --config sintel --workdir workdirs/flow_sintel \\
        data.path=/data/Sintel --parent_ckpt DIR_OF_A_SINTEL_PARENT \\
        init_ckpt=workdirs/flow_things/export/child

Copied from RAFT's sintel stage: AdamW 1.25e-4 (weight decay 1e-5), one-cycle, clip 1.0,
100k steps of batch 6, 368x768 crops with RAFT's Sintel augmentation, 12 iterations,
sequence loss gamma 0.85, starting from the things run's export with frozen BatchNorm.
RAFT trains this stage on a mixture; so does this config with ``data.sintel_mix``:
``C+T+S+K+H`` = ``100*sintel_clean + 100*sintel_final + 200*kitti + 5*hd1k + things``
(Table 1's C+T+S+K+H column; add ``data.things_path=... data.kitti_path=... data.hd1k_path=...``)
or ``C+T+K/S`` = ``100*sintel_clean + 100*sintel_final + things`` (``data.things_path``), each
dataset with RAFT's own augmentation. Not as RAFT: the default is Sintel alone (the only
dataset the command names), and 100 Sintel pairs (same indices in both passes) are held out
for selection and test; report the benchmark numbers with experiments.evaluate_flow.
"""

import dataclasses

from experiments.configs import flow_things


def get_config():
    things = flow_things.get_config()
    return dataclasses.replace(
        things,
        data=dataclasses.replace(
            things.data, source="sintel", path="data/Sintel", crop_size=(368, 768), validation_size=100, loss_gamma=0.85
        ),
        optim=dataclasses.replace(things.optim, weight_decay=1e-5),
        init_ckpt="workdirs/flow_things/export/child",
    )
