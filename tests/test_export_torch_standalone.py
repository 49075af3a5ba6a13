"""``export-torch`` writes the model definition beside the weights: a process where ``import jax`` fails
and hkt_jax is not on the path loads the child with the copied file alone and reproduces the project's
logits, through ``load`` + ``Preprocess`` and through ``RawImageClassifier`` (uint8 NHWC in)."""

from __future__ import annotations

import ast

import numpy as np
import pytest

pytest.importorskip("torch", reason="export-torch needs PyTorch (requirements-torch.txt)")

from hkt_jax.convert.__main__ import STANDALONE_MODEL_SOURCE, main  # noqa: E402
from tests.deploy_workdirs import blocked_jax_dir, make_workdir, project_outputs, raw_inputs, run_fresh  # noqa: E402

MAX_LOGIT_ERROR = 1e-4
# Run with PYTHONPATH = a directory whose jax package raises ImportError, from the export's directory.
LOAD_AND_RUN = """
try:
    import jax
except ImportError:
    pass
else:
    raise AssertionError("jax imported")
import numpy as np
import torch
from hkt_cifar_resnet import RawImageClassifier, load

model, preprocess = load("child.pt")
images = np.load("images.npy")
with torch.no_grad():
    logits = model(preprocess(images))
    raw = RawImageClassifier(model, preprocess.mean, preprocess.std)(torch.from_numpy(images))
np.save("logits.npy", logits.numpy())
np.save("raw_logits.npy", raw.numpy())
leaked = sorted(name for name in sys.modules if name.split(".")[0] in ("jax", "jaxlib", "hkt_jax", "flax"))
assert not leaked, leaked
"""


def test_model_file_imports_only_torch_and_numpy():
    tree = ast.parse(STANDALONE_MODEL_SOURCE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"__future__", "dataclasses", "os", "typing", "numpy", "torch"}, imported


def test_exported_child_loads_without_jax(tmp_path):
    workdir = make_workdir(tmp_path, "cifar_resnet")
    user = tmp_path / "deploy"
    assert main(["export-torch", "--src", str(workdir), "--out", str(user / "child.pt")]) == 0
    assert (user / "hkt_cifar_resnet.py").read_text() == STANDALONE_MODEL_SOURCE.read_text()

    images = raw_inputs("cifar_resnet", 5)[0]
    np.save(user / "images.npy", images)
    run_fresh(LOAD_AND_RUN, user, isolated=False, pythonpath=blocked_jax_dir(tmp_path))

    expected = project_outputs(workdir, "cifar_resnet", [images])
    assert np.std(expected) > 0.05
    for name in ("logits.npy", "raw_logits.npy"):
        got = np.load(user / name)
        assert got.shape == expected.shape == (5, 10)
        error = np.max(np.abs(got - expected))
        assert error < MAX_LOGIT_ERROR, f"{name}: max |logit difference| {error:.3g}"
