"""How open is the released code's GA gate on real pretrained features?

    python -m experiments.measure_gate [--shared DIR]

Converts the shared pretrained ResNet-20 (as child) and ResNet-56 (as parent),
takes their pooled 64-d features on the 20 lossless reference images, and
prints the gate a = sigmoid(<x', tau>/sqrt(C)) of ``mode="gate"``. A gate near 1
means GA = (1 - a)(tau - x') is close to zero: little is inherited.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from hkt_jax.convert import resnet_from_torch
from hkt_jax.engine.ga import gate_values
from hkt_jax.models import CifarResNet, run_all_stages

CHECKPOINTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.measure_gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shared",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        help="the shared data folder (default: %(default)s)",
    )
    folder = Path(parser.parse_args(argv).shared) / "resnet-cifar10-torch"
    reference = np.load(folder / "reference_logits_cifar10_first20.npz")
    images = jnp.asarray((reference["images_uint8"] / 255.0 - reference["mean"]) / reference["std"], jnp.float32)
    pooled = {
        depth: run_all_stages(CifarResNet(depth=depth), resnet_from_torch(folder / name, depth), images)[0]
        for depth, name in CHECKPOINTS.items()
    }
    gate = np.asarray(gate_values(pooled[20], pooled[56]))
    print(
        f"pooled feature L2 norm: child {float(jnp.linalg.norm(pooled[20], axis=-1).mean()):.2f}, "
        f"parent {float(jnp.linalg.norm(pooled[56], axis=-1).mean()):.2f}"
    )
    print(f"gate a over 20 images: mean {gate.mean():.4f}, min {gate.min():.4f}, max {gate.max():.4f}")


if __name__ == "__main__":
    main()
