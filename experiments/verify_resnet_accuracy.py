"""Top-1 of the converted pretrained CIFAR-10 ResNets, Flax next to PyTorch, on the shared JPEG test split.

Both frameworks see the same decoded images, so a conversion error shows as a gap
between the two columns. The absolute numbers sit below the published 91.78% /
93.62% because the shared copy is JPEG quality 75 (see shared data README).

  python -m experiments.verify_resnet_accuracy --json /tmp/resnet_accuracy.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from hkt_jax.convert import resnet_from_torch
from hkt_jax.convert.torch_models import CifarResNet as TorchCifarResNet  # the akamaster network (needs torch)
from hkt_jax.convert.torch_models import torch
from hkt_jax.models.cifar_resnet import CifarResNet

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CHECKPOINTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
EXPECTED_TOP1 = {20: 81.03, 56: 83.20}  # on this JPEG split
TOLERANCE_PT = 0.05
TEST_MEMBER = re.compile(r"(?:\./)?test/([a-z]+)/(\d+)\.jpg")


def load_test_split(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 test JPEGs as RGB uint8 NHWC (class order, then file order) and their labels."""
    found = []
    with tarfile.open(tarball) as archive:
        for member in archive:
            match = TEST_MEMBER.fullmatch(member.name)
            if match:
                image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                found.append((CLASSES.index(match[1]), int(match[2]), np.asarray(image)))
    found.sort(key=lambda item: item[:2])
    return np.stack([image for _, _, image in found]), np.array([label for label, _, _ in found])


def flax_predictions(variables, depth: int, images: np.ndarray, batch_size: int) -> np.ndarray:
    model = CifarResNet(depth=depth)
    predict = jax.jit(lambda v, x: model.apply(v, x, train=False).argmax(-1))
    return np.concatenate(
        [np.asarray(predict(variables, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def torch_predictions(checkpoint: Path, depth: int, images: np.ndarray, batch_size: int) -> np.ndarray:
    model = TorchCifarResNet(depth).eval()
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({key.removeprefix("module."): value for key, value in state_dict.items()}, strict=True)
    with torch.no_grad():
        batches = (
            torch.from_numpy(images[i : i + batch_size].transpose(0, 3, 1, 2).copy())
            for i in range(0, len(images), batch_size)
        )
        return np.concatenate([model(batch).argmax(-1).numpy() for batch in batches])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.verify_resnet_accuracy", description=__doc__.split("\n\n")[0]
    )
    default_data = Path(os.environ.get("HKT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data,
        help="shared data folder (default: $HKT_SHARED_DATA or <repo>/../shared/data)",
    )
    parser.add_argument(
        "--depths",
        type=int,
        nargs="+",
        default=sorted(CHECKPOINTS),
        choices=sorted(CHECKPOINTS),
        help="which pretrained ResNets to check",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=500,
        help="evaluation batch; one that divides 10,000 gives every batch one shape (one jit)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    start = time.time()
    images, labels = load_test_split(args.data / "cifar10-q75" / "cifar10-q75-imagefolder.tar.gz")
    normalised = ((images / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    print(f"decoded {len(images)} test JPEGs in {time.time() - start:.0f}s")

    results, all_ok = {}, True
    print(f"{'model':<10} {'flax top-1':>10} {'torch top-1':>11} {'disagree':>8} {'expected':>8}")
    for depth in args.depths:
        checkpoint = args.data / "resnet-cifar10-torch" / CHECKPOINTS[depth]
        start = time.time()
        flax_pred = flax_predictions(resnet_from_torch(checkpoint, depth), depth, normalised, args.batch_size)
        torch_pred = torch_predictions(checkpoint, depth, normalised, args.batch_size)
        flax_top1, torch_top1 = (100.0 * float(np.mean(pred == labels)) for pred in (flax_pred, torch_pred))
        ok = abs(flax_top1 - EXPECTED_TOP1[depth]) <= TOLERANCE_PT and flax_top1 == torch_top1
        all_ok &= ok
        results[f"resnet{depth}"] = {
            "flax_top1": flax_top1,
            "torch_top1": torch_top1,
            "expected_top1": EXPECTED_TOP1[depth],
            "prediction_disagreements": int(np.sum(flax_pred != torch_pred)),
            "images": len(labels),
            "seconds": round(time.time() - start, 1),
            "ok": ok,
        }
        print(
            f"{'resnet' + str(depth):<10} {flax_top1:>9.2f}% {torch_top1:>10.2f}% "
            f"{int(np.sum(flax_pred != torch_pred)):>8} {EXPECTED_TOP1[depth]:>7.2f}%  {'OK' if ok else 'MISMATCH'}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
