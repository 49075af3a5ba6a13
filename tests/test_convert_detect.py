"""Each converter names the other one's checkpoint (with the command to use) instead of listing its keys.

Tiny fabricated state dicts: detection reads key names and the stem's shape only.
"""

from __future__ import annotations

import numpy as np
import pytest

from hkt_jax.convert import raft_from_torch
from hkt_jax.convert.resnet import cifar_resnet_depth
from tests.conftest import require_shared


def cifar_resnet_keys(depth: int, groups: int = 3, stem=(16, 3, 3, 3), classifier: str = "linear") -> dict:
    blocks = (depth - 2) // 6
    state_dict = {"conv1.weight": np.zeros(stem, np.float32), "bn1.weight": np.zeros(16, np.float32)}
    for group in range(1, groups + 1):
        for block in range(blocks):
            for name in ("conv1.weight", "bn1.running_var", "conv2.weight"):
                state_dict[f"layer{group}.{block}.{name}"] = np.zeros(1, np.float32)
    state_dict[f"{classifier}.weight"] = np.zeros((10, 64), np.float32)
    return state_dict


def test_cifar_resnet_depth_from_the_keys_in_every_layout():
    akamaster = {
        "state_dict": {f"module.{key}": value for key, value in cifar_resnet_keys(56).items()},
        "best_prec1": 93.4,
    }
    assert cifar_resnet_depth(akamaster) == 56
    option_b = {**cifar_resnet_keys(20, classifier="fc"), "layer2.0.downsample.0.weight": np.zeros(1)}
    assert cifar_resnet_depth({"model": option_b}) == 20
    assert cifar_resnet_depth(cifar_resnet_keys(110)) == 110


def test_other_networks_are_not_cifar_resnets():
    imagenet = cifar_resnet_keys(14, groups=4, stem=(64, 3, 7, 7), classifier="fc")  # torchvision resnet18 naming
    assert cifar_resnet_depth(imagenet) is None
    assert cifar_resnet_depth(cifar_resnet_keys(20, groups=4)) is None
    uneven = {key: value for key, value in cifar_resnet_keys(20).items() if not key.startswith("layer3.2.")}
    assert cifar_resnet_depth(uneven) is None
    assert cifar_resnet_depth({"module.fnet.conv1.weight": np.zeros((32, 3, 7, 7))}) is None
    assert cifar_resnet_depth({"state_dict": {"conv1.weight": "not a tensor"}}) is None
    assert cifar_resnet_depth([1, 2]) is None


def test_raft_converter_names_a_cifar_resnet_and_its_depth():
    with pytest.raises(ValueError) as error:
        raft_from_torch({"state_dict": cifar_resnet_keys(32)})
    assert str(error.value) == (
        "not a RAFT checkpoint: it holds a CIFAR ResNet of depth 32 (detected from its keys); convert it with "
        "resnet_from_torch(..., depth=32) or `python -m hkt_jax.convert resnet --src FILE --depth 32 --out DIR`"
    )


def test_cli_suggests_the_other_command_each_way(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="the converter command line reads PyTorch files")
    from hkt_jax.convert.__main__ import main

    resnet = tmp_path / "resnet44.th"
    torch.save(
        {"state_dict": {f"module.{key}": torch.from_numpy(value) for key, value in cifar_resnet_keys(44).items()}},
        resnet,
    )
    assert main(["raft", "--src", str(resnet), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"python -m hkt_jax.convert raft: error: {resnet} looks like a CIFAR ResNet checkpoint (depth 44, detected "
        f"from its keys), not RAFT: use `python -m hkt_jax.convert resnet --src {resnet} --depth 44 --out DIR`"
    )
    raft = tmp_path / "raft.pth"  # torchvision's layout, RAFT large by its 64-channel feature stem
    torch.save({"feature_encoder.convnormrelu.0.weight": torch.zeros(64, 3, 7, 7)}, raft)
    assert main(["resnet", "--src", str(raft), "--depth", "20", "--out", str(tmp_path / "out")]) == 1
    assert (
        "looks like a RAFT checkpoint (torchvision layout), not a CIFAR ResNet: use `python -m hkt_jax.convert "
        f"raft --src {raft} --out DIR`" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_real_resnet56_given_to_the_raft_converter(tmp_path, capsys):
    pytest.importorskip("torch", reason="the converter command line reads PyTorch files")
    from hkt_jax.convert.__main__ import main

    src = require_shared("resnet-cifar10-torch", "resnet56-4bfd9763.th")
    assert main(["raft", "--src", str(src), "--out", str(tmp_path / "out")]) == 1
    assert f"--src {src} --depth 56 --out DIR" in capsys.readouterr().err
