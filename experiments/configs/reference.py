"""The authors' released CIFAR code (HKT-ResNet, ``train.py`` + ``genetic_attention.py``), reproduced.

    python -m experiments.cifar_hkt --config reference [--parent_ckpt DIR]

As released: ResNet-110 parent -> ResNet-20 child, one inheritance point after global average
pooling (64-d vectors), gate-form GA with lambda = 0.6, head mixing anchored on the child in both
directions (``hkt.head_anchor=child``: ``parent_child_attention(out2_h, out_2)``), cross-entropy for
all three streams, SGD momentum 0.9, batch 128, x0.1 at epochs 100 and 150, ImageNet mean/std
normalisation, pad-4 random crop + horizontal flip.

The released loss is the plain sum L1 + L2 + L3 at lr 0.01, weight decay 1e-4. Eq. 9 here needs the
weights to sum to 1, so we train (L1 + L2 + L3) / 3 at lr 0.03 with weight decay 1e-4 / 3: with
PyTorch-style SGD (decay added to the gradient, then momentum) every update is exactly the released one.

Remaining differences from the released code, all deliberate:

* the parent is frozen in inference mode (BatchNorm running statistics, parameters under
  ``stop_gradient``); the released parent runs in train mode, so its BatchNorm uses batch statistics and
  keeps updating its running averages, and it runs without ``no_grad``;
* model selection: a 5,000-image validation split held out of the 50,000 training images (so the child
  trains on 45,000) selects the best network, and the summary reports final and best; the released
  script trains on all 50,000 and keeps the epoch that scores best on the test set;
* length: 200 epochs; the released script's default is 64,000 epochs (it runs until stopped, at lr 1e-4
  after epoch 150);
* start: the child starts from scratch; one released version resumes it by default from
  ``save_resnet20/checkpoint_41150.pth`` when that file exists (``init_ckpt=DIR`` does the same here);
* the parent: the released code loads akamaster's pretrained ResNet-110 (``resnet110-1d1ed7c2.th``;
  convert it with ``python -m hkt_jax.convert resnet --depth 110`` and pass ``parent_ckpt``); without a
  ``parent_ckpt`` a ResNet-110 is trained here first, with the low-rate warm-up of ``default``
  (400 steps at lr/10 - here 0.003, as lr is 0.03);
* numerics: JAX/XLA on float32 (no ``--half``), and this project's data pipeline (grain, its own
  shuffling and augmentation random streams).
"""

import dataclasses

from experiments.configs import default
from hkt_jax.training.config import ExperimentConfig, HKTSettings, apply_overrides

RELEASED_LR, RELEASED_WEIGHT_DECAY, STREAMS = 0.01, 1e-4, 3


def get_config() -> ExperimentConfig:
    config = default.get_config()
    return dataclasses.replace(
        config,
        optim=dataclasses.replace(
            config.optim,
            learning_rate=RELEASED_LR * STREAMS,
            weight_decay=RELEASED_WEIGHT_DECAY / STREAMS,
            schedule="multistep",
            milestones=(100.0, 150.0),
        ),
        hkt=HKTSettings(
            lam=0.6,
            mode="gate",
            alphas=(1 / 3, 1 / 3, 1 / 3),
            inherit_loss="ce",
            stage_split="paper",
            head_anchor="child",
        ),
    )


def overrides() -> tuple[str, ...]:
    """The ``key=value`` overrides that turn ``default`` into this config: what a grid's ``reference``
    variant passes (on ``default`` or a config derived from it), so the settings have one definition."""

    def flat(record, prefix=""):
        for key, value in record.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    def text(value):
        return ",".join(map(repr, value)) if isinstance(value, (list, tuple)) else str(value)

    base = dict(flat(default.get_config().record()))
    lines = tuple(f"{key}={text(value)}" for key, value in flat(get_config().record()) if base.get(key) != value)
    if apply_overrides(default.get_config(), lines) != get_config():  # a value that does not survive the text
        raise RuntimeError(f"reference.overrides() does not rebuild the reference config: {lines}")
    return lines
