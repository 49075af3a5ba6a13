"""A short real training on the shared CIFAR-10 JPEGs reaches accuracy well above chance.

Integration check of the whole stack on real images (data pipeline, augmentation,
model, optimizer, eval): ResNet-8 for 200 steps of batch 64 (~0.3 epoch).
Skipped with a reason when the shared archive is absent.
"""

from __future__ import annotations

from experiments.configs import smoke
from hkt_jax.training.config import apply_overrides
from hkt_jax.training.train import train_and_evaluate
from tests.conftest import require_shared


def test_resnet8_learns_real_cifar10(tmp_path):
    archive = require_shared("cifar10-q75", "cifar10-q75-imagefolder.tar.gz")
    config = apply_overrides(
        smoke.get_config(),
        [
            "method=child",
            "child.depth=8",
            "data.source=image_folder",
            f"data.path={archive}",
            "data.validation_size=1000",
            "train.batch_size=64",
            "train.steps=200",
            "train.log_every_steps=50",
            "train.eval_every_steps=200",
            "train.checkpoint_every_steps=200",
            "optim.learning_rate=0.1",
            "optim.schedule=cosine",
            "optim.warmup_epochs=0.05",
        ],
    )
    summary = train_and_evaluate(config, tmp_path)
    # Chance is 10%; 300 steps of batch 128 gave 47% test accuracy here.
    assert summary["final_test_accuracy"] > 0.25, summary
    assert summary["final_validation_accuracy"] > 0.25, summary
