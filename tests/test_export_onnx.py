"""``export-onnx``: the PyTorch twins (CIFAR ResNet; torchvision RAFT-S; the library's PocketNet), raw inputs
and preprocessing inside, traced to ONNX, give the project's outputs under onnxruntime at two batch sizes
(dynamic batch axis)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="export-onnx traces the PyTorch twin (requirements-torch.txt)")
pytest.importorskip("onnx", reason="torch.onnx.export writes through the onnx package (requirements-test.txt)")
pytest.importorskip("onnxruntime", reason="the check runs the file with onnxruntime (requirements-test.txt)")

from hkt_jax.convert.__main__ import main  # noqa: E402
from hkt_jax.convert.deploy import Deployable  # noqa: E402
from hkt_jax.convert.onnx_export import export_onnx, run_onnx  # noqa: E402
from tests.deploy_workdirs import make_workdir, project_outputs_per_batch, raw_inputs  # noqa: E402

BATCH_SIZES = (1, 3)
# float32 through a different runtime: PyTorch's graph order of operations, not XLA's.
MAX_LOGIT_ERROR = 1e-4
MAX_FLOW_RELATIVE_ERROR = 1e-4
RAFT_FRAME = 128  # torchvision's RAFT needs frames of at least 128x128


@pytest.mark.parametrize("arch", ["cifar_resnet", "raft", "pocketnet"])
def test_onnx_export_matches_project_outputs(tmp_path, arch, capsys):
    frame = RAFT_FRAME if arch == "raft" else None
    workdir = make_workdir(tmp_path, arch, **({"frame": frame} if frame else {}))
    out = tmp_path / "child.onnx"
    assert main(["export-onnx", "--src", str(workdir), "--out", str(out)]) == 0
    description = json.loads(out.with_suffix(".json").read_text())
    raw_dtype = "float32" if arch == "pocketnet" else "uint8"  # Hounsfield units; pixels
    assert [spec["dtype"] for spec in description["inputs"]] == [raw_dtype] * len(description["inputs"])

    if arch == "raft":  # 64x64 frames are fine for JAX's RAFT, too small for torchvision's
        too_small = ["--frame_size", "64"]
        assert main(["export-onnx", "--src", str(workdir), "--out", str(tmp_path / "x.onnx"), *too_small]) == 1
        assert not (tmp_path / "x.onnx").exists()
        assert "at least 128x128" in capsys.readouterr().err

    all_inputs = [raw_inputs(arch, batch, seed=batch, **({"frame": frame} if frame else {})) for batch in BATCH_SIZES]
    all_expected = project_outputs_per_batch(workdir, arch, all_inputs)
    for batch, inputs, expected in zip(BATCH_SIZES, all_inputs, all_expected):
        got = run_onnx(out, *inputs)
        assert got.shape == expected.shape and expected.shape[0] == batch
        if arch == "raft":
            scale = np.max(np.abs(expected))
            assert scale > 0.1
            error = np.max(np.abs(got - expected)) / scale
            assert error < MAX_FLOW_RELATIVE_ERROR, f"flow error {error:.3g} of the flow's scale {scale:.3g}"
        else:
            error = np.max(np.abs(got - expected))
            assert error < MAX_LOGIT_ERROR, f"max |logit difference| {error:.3g}"
            assert np.std(expected) > 0.05
            np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


def test_children_without_a_torch_twin_are_refused(tmp_path):
    deployable = Deployable("dense_unet", apply=None, inputs=(), output="", preprocessing={}, spec={}, variables={})
    with pytest.raises(ValueError, match="use export-stablehlo"):
        export_onnx(deployable, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
