"""hkt_jax.convert.raft against torchvision's RAFT models (random weights) and princeton-vl checkpoints.

torchvision's ``raft_large`` / ``raft_small`` (weights=None, seeded, BatchNorm statistics
randomised) are the second reference: same network, other key names, images in [-1, 1].
Frames are a 128x192 crop of a FlyingChairs pair so each size is jitted once and the
eager PyTorch runs stay short.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the RAFT converter tests need PyTorch (requirements-test.txt)")
torchvision = pytest.importorskip("torchvision", reason="the RAFT converter tests need torchvision")
from torchvision.models.optical_flow import raft_large, raft_small  # noqa: E402

from hkt_jax.training.checkpoint import load_model  # noqa: E402
from hkt_jax.convert import raft_from_torch, raft_to_torch  # noqa: E402
from hkt_jax.convert.__main__ import main  # noqa: E402
from hkt_jax.data.flow_io import read_image  # noqa: E402
from hkt_jax.models import RAFT  # noqa: E402
from tests.conftest import require_shared  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

ITERS = 12
MAX_MEAN_EPE_DIFF, MAX_EPE_DIFF = 1e-3, 1e-2
SIZES = ("large", "small")


def torchvision_model(size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = (raft_small if size == "small" else raft_large)(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mixed-up mean/var or scale/bias shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model.eval()


@functools.cache
def frames() -> tuple[np.ndarray, np.ndarray]:
    root = require_shared("flow", "flyingchairs")
    return tuple(read_image(root / f"0000000-img{k}.ppm")[None, 100:228, 150:342] for k in (0, 1))


def torchvision_flows(model: torch.nn.Module) -> np.ndarray:
    """(iters, H, W, 2) from torchvision, fed [-1, 1] images as it expects."""
    image1, image2 = (torch.from_numpy(2 * (f / 255.0) - 1).permute(0, 3, 1, 2).float() for f in frames())
    with torch.no_grad():
        flows = model(image1, image2, num_flow_updates=ITERS)
    return np.stack([f[0].permute(1, 2, 0).numpy() for f in flows])


@functools.cache
def jitted_flows(size: str):
    model = RAFT(small=size == "small", unroll=1)  # rolled: compiles faster, same flows
    return jax.jit(lambda v, a, b: model.apply(v, a, b, iters=ITERS))


def flax_flows(size: str, variables) -> np.ndarray:
    return np.asarray(jitted_flows(size)(variables, *frames()))[:, 0]


def assert_flows_match(ours: np.ndarray, theirs: np.ndarray, what: str):
    for iteration in (0, ITERS - 1):
        epe = np.linalg.norm(ours[iteration].astype(np.float64) - theirs[iteration], axis=-1)
        assert epe.mean() < MAX_MEAN_EPE_DIFF and epe.max() < MAX_EPE_DIFF, (
            f"{what}, iteration {iteration + 1}: end-point difference mean {epe.mean():.2e}, max {epe.max():.2e}"
        )


def princeton_state_dict(size: str) -> dict:
    return torch.load(require_shared("raft-reference", f"raft-{size}-seed0.pth"), weights_only=True)


@pytest.mark.parametrize("size", SIZES)
def test_torchvision_weights_give_torchvision_flows(size):
    model = torchvision_model(size)
    variables = raft_from_torch(model.state_dict())
    assert_flows_match(flax_flows(size, variables), torchvision_flows(model), f"{size} vs torchvision")
    # and back: the export is the torchvision state dict, key for key and bit for bit
    exported = raft_to_torch(variables)
    original = model.state_dict()
    assert list(exported) == list(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value) or key.endswith("num_batches_tracked"), key


@pytest.mark.parametrize("size", SIZES)
def test_princeton_to_torchvision_round_trip(size):
    """princeton-vl checkpoint -> Flax -> torchvision layout: loads strict and runs to the same flows."""
    variables = raft_from_torch(princeton_state_dict(size))
    model = (raft_small if size == "small" else raft_large)(weights=None).eval()
    model.load_state_dict(raft_to_torch(variables, small=size == "small"), strict=True)
    assert_flows_match(flax_flows(size, variables), torchvision_flows(model), f"{size} princeton-vl round trip")


def test_duplicated_norm3_must_agree():
    state_dict = princeton_state_dict("large")
    variables = raft_from_torch(state_dict)
    np.testing.assert_array_equal(
        variables["batch_stats"]["cnet"]["layer2_0"]["norm3"]["var"],
        state_dict["module.cnet.layer2.0.norm3.running_var"].numpy(),
    )
    state_dict["module.cnet.layer3.0.norm3.weight"] = state_dict["module.cnet.layer3.0.norm3.weight"] + 1
    with pytest.raises(ValueError, match=r"cnet\.layer3\.0\.norm3\.weight differs from cnet\.layer3\.0\.downsample"):
        raft_from_torch(state_dict)


def test_truncated_state_dict_lists_every_missing_key():
    state_dict = princeton_state_dict("small")
    dropped = [key for key in state_dict if ".update_block." in key]
    for key in dropped:
        del state_dict[key]
    with pytest.raises(ValueError) as error:
        raft_from_torch(state_dict)
    message = str(error.value)
    assert f"{len(dropped)} missing keys" in message
    assert all(key.removeprefix("module.") in message for key in dropped)


def test_wrong_size_lists_the_problems():
    with pytest.raises(ValueError) as error:
        raft_from_torch(princeton_state_dict("large"), small=True)
    message = str(error.value)
    assert "the checkpoint is RAFT(small=False)" in message and "asked for RAFT(small=True)" in message
    assert (
        "shape mismatches" in message and "fnet.conv1.weight: checkpoint (64, 3, 7, 7), model (32, 3, 7, 7)" in message
    )
    assert "unexpected keys" in message and "cnet.norm1.running_mean" in message


def test_extra_and_misshaped_keys_are_listed():
    state_dict = princeton_state_dict("small")
    state_dict["module.update_block.extra.weight"] = torch.zeros(3)
    state_dict["module.update_block.flow_head.conv2.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        raft_from_torch(state_dict)
    assert "update_block.extra.weight (3,)" in str(error.value)
    assert "update_block.flow_head.conv2.bias: checkpoint (3,), model (2,)" in str(error.value)


def test_resnet_checkpoint_is_not_raft():
    with pytest.raises(ValueError, match="not a RAFT checkpoint.*conv1.weight"):
        raft_from_torch(torchvision.models.resnet18(weights=None).state_dict())


def test_cli_converts_and_exports(tmp_path, capsys):
    src = require_shared("raft-reference", "raft-small-seed0.pth")
    assert main(["raft", "--src", str(src), "--out", str(tmp_path / "raft_s")]) == 0
    variables, spec = load_model(tmp_path / "raft_s")
    assert spec["arch"] == "raft" and spec["kwargs"] == {"small": True}
    assert main(["export-torch", "--src", str(tmp_path / "raft_s"), "--out", str(tmp_path / "raft_s.pt")]) == 0
    exported = torch.load(tmp_path / "raft_s.pt", weights_only=True)
    raft_small(weights=None).load_state_dict(exported["state_dict"], strict=True)
    assert "RAFT(small=True)" in capsys.readouterr().out


def test_cli_error_writes_nothing(tmp_path, capsys):
    truncated = princeton_state_dict("small")
    del truncated["module.fnet.conv1.bias"]
    torch.save(truncated, tmp_path / "truncated.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    for name in ("truncated.pth", "resnet.pth"):
        assert main(["raft", "--src", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 1
        assert not (tmp_path / "out").exists()
    errors = capsys.readouterr().err
    assert "fnet.conv1.bias (32,)" in errors and "not a RAFT checkpoint" in errors
