"""A trained child, exported with ``export-torch``, classifies real images in plain PyTorch as Flax does.

End to end, as a user would: a short real training run (CLI), ``python -m
hkt_jax.convert export-torch``, then the PyTorch snippet of ``docs/converters-and-export.md`` in a fresh
process that imports nothing from ``tests/``, run on the 20 lossless CIFAR-10
test images. Flax (in this process, normalising as the training pipeline does)
is the reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="export-torch needs PyTorch (requirements-torch.txt)")

from hkt_jax.training.checkpoint import load_model  # noqa: E402
from hkt_jax.data.pipeline import NORMALIZATIONS  # noqa: E402
from hkt_jax.models.registry import build_model  # noqa: E402
from tests.conftest import REPO_ROOT, require_shared  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

MAX_LOGIT_ERROR = 1e-4
SNIPPET_PAGE = REPO_ROOT / "docs" / "converters-and-export.md"
SNIPPET_MARKER = "<!-- the PyTorch snippet below is run by tests/test_export_torch.py -->"
# Runs after the documented snippet, in the same process: the snippet's `model` and `preprocess` on every image.
ALL_IMAGES = """
import sys
from pathlib import Path
import numpy as np
leaked = sorted(name for name in sys.modules if name == "tests" or name.startswith("tests."))
assert not leaked, f"imported from tests/: {leaked}"
with torch.no_grad():
    all_logits = torch.cat([model(preprocess(Image.open(png))) for png in sorted(Path(SAMPLES).glob("cifar10_*.png"))])
np.save("torch_logits.npy", all_logits.numpy())
"""


def run(command: list[str], cwd, timeout: int = 240) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def documented_snippet() -> str:
    page = SNIPPET_PAGE.read_text()
    assert SNIPPET_MARKER in page, f"{SNIPPET_PAGE.name} lost the tested export-torch snippet"
    match = re.search(r"```python\n(.*?)```", page[page.index(SNIPPET_MARKER) :], re.DOTALL)
    return match.group(1)


def flax_logits(model_dir, images_uint8: np.ndarray, normalization: str) -> np.ndarray:
    """The exported Flax child on images normalised as the training pipeline does (float64, then float32)."""
    variables, spec = load_model(model_dir)
    mean, std = (np.asarray(value) for value in NORMALIZATIONS[normalization])
    normalised = ((images_uint8 / 255.0 - mean) / std).astype(np.float32)
    return np.asarray(jax.jit(lambda v, x: build_model(spec).apply(v, x, train=False))(variables, normalised))


def test_exported_smoke_child_classifies_real_images_in_pytorch_like_flax(tmp_path):
    from PIL import Image

    samples = require_shared("cifar-samples")
    pngs = sorted(samples.glob("cifar10_*.png"))
    assert len(pngs) == 20
    workdir, user_dir = tmp_path / "run", tmp_path / "user"
    user_dir.mkdir()
    run(
        [
            sys.executable,
            "-m",
            "experiments.cifar_hkt",
            "--config",
            "smoke",
            "--workdir",
            str(workdir),
            "method=child",
            "train.steps=10",
        ],
        cwd=REPO_ROOT,
    )
    exported = run(
        [
            sys.executable,
            "-m",
            "hkt_jax.convert",
            "export-torch",
            "--src",
            str(workdir),
            "--out",
            str(user_dir / "child.pt"),
        ],
        cwd=REPO_ROOT,
    )
    assert "load_exported" in exported

    # What was recorded is what training used.
    normalization = json.loads((workdir / "config.json").read_text())["data"]["normalization"]
    record = json.loads((user_dir / "child.json").read_text())
    mean, std = NORMALIZATIONS[normalization]
    assert record["preprocessing"]["mean"] == list(mean) and record["preprocessing"]["std"] == list(std)
    assert record["preprocessing"]["layout"] == "NCHW" and record["preprocessing"]["input_range"] == [0, 255]
    assert record["torch_model"]["kwargs"] == {"depth": 8, "num_classes": 10, "shortcut": "A"}

    # The documented snippet, verbatim, on one image (cifar10_00_3.png is a cat), then on all 20.
    shutil.copy(pngs[0], user_dir / "cat.png")
    script = documented_snippet() + f"\nSAMPLES = {str(samples)!r}\n" + ALL_IMAGES
    printed = run([sys.executable, "-c", script], cwd=user_dir)
    torch_logits = np.load(user_dir / "torch_logits.npy")

    images = np.stack([np.asarray(Image.open(png).convert("RGB")) for png in pngs])
    expected = flax_logits(workdir / "export" / "child", images, normalization)
    assert torch_logits.shape == expected.shape == (20, 10)
    error = np.max(np.abs(torch_logits - expected))
    assert error < MAX_LOGIT_ERROR, f"max |logit difference| {error:.3g} (logit scale {np.max(np.abs(expected)):.3g})"
    np.testing.assert_array_equal(torch_logits.argmax(-1), expected.argmax(-1))
    assert printed.strip().splitlines()[-1] == record["preprocessing"]["class_names"][expected[0].argmax()]
