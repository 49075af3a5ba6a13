"""``export-stablehlo``: every task's child, serialised with jax.export, reproduces the project's outputs
in a fresh process that has jax and numpy but no hkt_jax, at two batch sizes (the batch is symbolic)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hkt_jax.convert.__main__ import main
from tests.deploy_workdirs import make_workdir, project_outputs, project_outputs_per_batch, raw_inputs, run_fresh

BATCH_SIZES = (1, 3)
# Run in a process started with -I from a directory outside the repository: only jax + numpy.
LOAD_AND_RUN = """
import json
import jax
import numpy as np
exported = jax.export.deserialize(bytearray(open("child.jaxexport", "rb").read()))
inputs = np.load("inputs.npz")
outputs = dict()
for batch in {batch_sizes}:
    args = [inputs[f"{{batch}}_{{k}}"] for k in range({count})]
    outputs[str(batch)] = np.asarray(exported.call(*args))
np.savez("outputs.npz", **outputs)
print(json.dumps([str(a) for a in exported.in_avals]))
"""


@pytest.mark.parametrize("arch", ["cifar_resnet", "raft", "pocketnet"])
def test_exported_child_reproduces_project_outputs_without_hkt_jax(tmp_path, arch):
    workdir = make_workdir(tmp_path, arch)
    user = tmp_path / "user"
    user.mkdir()
    assert main(["export-stablehlo", "--src", str(workdir), "--out", str(user / "child.jaxexport")]) == 0

    inputs = {batch: raw_inputs(arch, batch, seed=batch) for batch in BATCH_SIZES}
    np.savez(user / "inputs.npz", **{f"{b}_{k}": x for b, xs in inputs.items() for k, x in enumerate(xs)})
    printed = run_fresh(LOAD_AND_RUN.format(batch_sizes=BATCH_SIZES, count=len(inputs[1])), user)
    assert all(aval.startswith(("uint8[b,", "float32[b,")) for aval in json.loads(printed.splitlines()[-1]))
    outputs = np.load(user / "outputs.npz")

    description = json.loads((user / "child.json").read_text())
    assert description["arch"] == arch and description["inputs"][0]["shape"][0] is None
    all_expected = project_outputs_per_batch(workdir, arch, [inputs[batch] for batch in BATCH_SIZES])
    for batch, expected in zip(BATCH_SIZES, all_expected):
        got = outputs[str(batch)]
        assert got.shape == expected.shape and got.dtype == np.float32
        assert expected.shape[0] == batch
        if arch == "raft":  # flows: within 1e-4 relative to the flow's scale
            scale = np.max(np.abs(expected))
            assert scale > 0.1
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)
        else:  # logits
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
            assert np.std(expected) > 0.05, "outputs too flat to tell a wrong preprocessing apart"


def test_preprocessing_is_the_runs_own(tmp_path):
    """The normalisation / HU window come from the run's config.json: another one changes the outputs."""
    workdir = make_workdir(tmp_path, "cifar_resnet")
    right, wrong = tmp_path / "right.jaxexport", tmp_path / "wrong.jaxexport"
    assert main(["export-stablehlo", "--src", str(workdir), "--out", str(right)]) == 0
    assert main(["export-stablehlo", "--src", str(workdir), "--out", str(wrong), "--normalization", "imagenet"]) == 0
    assert json.loads(right.with_suffix(".json").read_text())["preprocessing"]["normalization"] == "cifar"
    import jax

    images = raw_inputs("cifar_resnet", 2)[0]
    run = [jax.export.deserialize(bytearray(path.read_bytes())).call(images) for path in (right, wrong)]
    np.testing.assert_allclose(run[0], project_outputs(workdir, "cifar_resnet", [images]), atol=1e-5)
    assert np.max(np.abs(np.asarray(run[0]) - np.asarray(run[1]))) > 1e-2


def test_clear_errors(tmp_path, capsys):
    assert main(["export-stablehlo", "--src", str(tmp_path), "--out", str(tmp_path / "x.jaxexport")]) == 1
    assert "neither a model checkpoint dir nor a training workdir" in capsys.readouterr().err
    workdir = make_workdir(tmp_path, "pocketnet")
    (workdir / "config.json").write_text("{}")
    assert main(["export-stablehlo", "--src", str(workdir), "--out", str(tmp_path / "x.jaxexport")]) == 1
    assert "--slice_size" in capsys.readouterr().err
    assert (
        main(["export-stablehlo", "--src", str(workdir), "--out", str(tmp_path / "x.jaxexport"), "--slice_size", "30"])
        == 1
    )
    assert "multiples of 4" in capsys.readouterr().err
