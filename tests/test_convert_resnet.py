"""hkt_jax.convert.resnet against the PyTorch reference model.

The reference is akamaster/pytorch_resnet_cifar10's ``resnet.py`` (BSD-2-Clause,
Copyright (c) 2018 Yerlan Idelbayev), with its option-B projection shortcut, as
shipped in ``hkt_jax.convert.torch_models``: the real checkpoints in the shared
data were trained with it, and it must reproduce the logits recorded with them.
Every Flax forward pass uses a batch of 20 (the reference images), so each
architecture is jitted once.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch", reason="the *_vs_reference converter tests need PyTorch (requirements-test.txt)")
from torch import nn  # noqa: E402

from hkt_jax.training.checkpoint import load_model, save_model  # noqa: E402
from hkt_jax.convert import resnet_from_torch, resnet_to_torch  # noqa: E402
from hkt_jax.convert.__main__ import build_parser, main  # noqa: E402
from hkt_jax.convert.torch_models import CifarResNet as TorchCifarResNet  # noqa: E402
from hkt_jax.convert.torch_models import load_exported  # noqa: E402
from hkt_jax.models.cifar_resnet import CifarResNet  # noqa: E402
from hkt_jax.models.registry import model_spec  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.conftest import require_shared as shared_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")  # compared with float64 / PyTorch: no TF32 on GPUs

BATCH = 20
MAX_LOGIT_ERROR = 1e-4
REAL_CHECKPOINTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}


# --- helpers -----------------------------------------------------------------------------------------------------


@functools.cache
def reference_model(shortcut: str) -> TorchCifarResNet:
    """Random-weight PyTorch ResNet-20 in eval mode.

    BN statistics are measured on a random batch and then jittered (no init value
    could fake them), and the classifier is centred on that batch: logits of a few
    units whose argmax depends on the input, so 1e-4 and argmax checks both bite.
    """
    torch.manual_seed({"A": 0, "B": 1}[shortcut])
    model = TorchCifarResNet(20, 10, shortcut)
    batchnorms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    calibration = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = None  # cumulative average: after one batch the running stats are that batch's
        model.train()(calibration)
        for bn in batchnorms:
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
            bn.num_batches_tracked.fill_(123)
        model.eval()
        model.linear.bias.sub_(model(calibration).mean(0))
    return model


@functools.cache
def random_flax_variables(shortcut: str) -> dict:
    """Flax ResNet-20 variables made on the Flax side, randomised like ``reference_model``.

    The tree comes from ``jax.eval_shape`` and is filled with numpy draws (He-normal
    kernels): ``CifarResNet.init`` takes ~15 s on a 2-core CPU.
    """
    model = CifarResNet(depth=20, shortcut=shortcut)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng({"A": 10, "B": 11}[shortcut])

    def draw(key, shape):
        if key[-1] == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        if key[-1] == "scale":
            return rng.uniform(0.5, 1.5, shape)
        return rng.normal(0.0, 0.1, shape) if key[-1] == "bias" else np.zeros(shape)

    flat = {key: draw(key, leaf.shape).astype(np.float32) for key, leaf in traverse_util.flatten_dict(shapes).items()}
    # Running stats start at zero, so one train step (momentum 0.9) leaves exactly 0.1 x the batch statistics.
    calibration = random_images(seed=100)
    _, measured = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        traverse_util.unflatten_dict(flat), calibration
    )
    for key, value in traverse_util.flatten_dict(jax.device_get(measured)).items():
        flat[key] = 10.0 * value
    for key in [key for key in flat if key[-1] == "var"]:
        mean_key = (*key[:-1], "mean")
        flat[mean_key] = flat[mean_key] + 0.1 * np.sqrt(flat[key]) * rng.normal(size=flat[key].shape)
        flat[key] = flat[key] * rng.uniform(0.8, 1.25, flat[key].shape)
    flat = {key: value.astype(np.float32) for key, value in flat.items()}
    calibration_logits = flax_logits(traverse_util.unflatten_dict(flat), calibration, shortcut=shortcut)
    flat[("params", "fc", "bias")] -= calibration_logits.mean(0)
    return traverse_util.unflatten_dict(flat)


@functools.cache
def flax_apply(depth: int, num_classes: int, shortcut: str):
    model = CifarResNet(depth=depth, num_classes=num_classes, shortcut=shortcut)
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def flax_logits(variables, images_nhwc, depth=20, num_classes=10, shortcut="A") -> np.ndarray:
    return np.asarray(flax_apply(depth, num_classes, shortcut)(variables, images_nhwc))


def torch_logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def random_images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)


def assert_logits_match(actual: np.ndarray, expected: np.ndarray):
    assert actual.shape == expected.shape
    error = np.max(np.abs(actual - expected))
    assert error < MAX_LOGIT_ERROR, f"max |logit difference| {error:.3g} (logit scale {np.max(np.abs(expected)):.3g})"
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


def assert_trees_bit_identical(actual, expected):
    flat_actual, flat_expected = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert list(sorted(flat_actual)) == list(sorted(flat_expected))
    for key, value in flat_expected.items():
        assert flat_actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(flat_actual[key], value, err_msg="/".join(key), strict=True)


def state_dict_of(shortcut: str) -> dict:
    """A fresh dict (same tensors) that tests may add to or drop from."""
    return dict(reference_model(shortcut).state_dict())


def conversion_error(state_dict, depth=20, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        resnet_from_torch(state_dict, depth, **kwargs)
    return str(error.value)


# --- PyTorch -> Flax -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_random_resnet20_from_torch_vs_reference(shortcut):
    model = reference_model(shortcut)
    variables = resnet_from_torch(model.state_dict(), 20)
    images = random_images()
    assert ("shortcut_conv" in variables["params"]["layer2_0"]) == (shortcut == "B")
    assert_logits_match(flax_logits(variables, images, shortcut=shortcut), torch_logits(model, images))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_random_resnet20_to_torch_vs_reference(shortcut):
    variables = random_flax_variables(shortcut)
    state_dict = resnet_to_torch(variables)
    model = TorchCifarResNet(20, 10, shortcut).eval()
    model.load_state_dict(state_dict, strict=True)
    assert list(state_dict) == list(model.state_dict()), "export keeps PyTorch's own key order"
    images = random_images(1)
    assert_logits_match(torch_logits(model, images), flax_logits(variables, images, shortcut=shortcut))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_round_trip_flax_torch_flax_vs_reference_is_bit_exact(shortcut):
    variables = random_flax_variables(shortcut)
    assert_trees_bit_identical(resnet_from_torch(resnet_to_torch(variables), 20), variables)


def test_round_trip_torch_flax_torch_vs_reference_is_bit_exact():
    original = state_dict_of("B")
    exported = resnet_to_torch(resnet_from_torch(original, 20))
    assert list(exported) == list(original)
    for key, tensor in original.items():
        expected = torch.zeros_like(tensor) if key.endswith("num_batches_tracked") else tensor
        assert torch.equal(exported[key], expected), key


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "net"])
def test_wrapped_prefixed_and_renamed_checkpoint_vs_reference(tmp_path, wrapper):
    """DataParallel prefixes, training wrappers and the distillation repos' fc/downsample names all load."""
    renamed = {
        "module." + key.replace("linear.", "fc.").replace(".shortcut.", ".downsample."): value
        for key, value in state_dict_of("B").items()
    }
    path = tmp_path / "teacher.pth"
    torch.save({wrapper: renamed, "epoch": 240, "best_acc": 71.5}, path)
    assert_trees_bit_identical(resnet_from_torch(path, 20), resnet_from_torch(state_dict_of("B"), 20))


# --- bad checkpoints: one ValueError naming every offending key ---------------------------------------------------


def test_missing_key_is_listed():
    state_dict = state_dict_of("A")
    del state_dict["layer2.1.bn1.running_var"]
    message = conversion_error(state_dict)
    assert "1 missing keys" in message
    assert "layer2.1.bn1.running_var (32,) (-> batch_stats/layer2_1/bn1/var)" in message


def test_unexpected_key_is_listed():
    state_dict = state_dict_of("A")
    state_dict["layer1.0.attention.weight"] = torch.zeros(16, 16)
    state_dict["bn1.running_std"] = torch.zeros(16)
    message = conversion_error(state_dict)
    assert "2 unexpected keys" in message
    assert "layer1.0.attention.weight (16, 16)" in message
    assert "bn1.running_std (16,)" in message


def test_shape_mismatch_is_listed():
    state_dict = state_dict_of("A")
    state_dict["layer3.2.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    message = conversion_error(state_dict)
    assert "1 shape mismatches" in message
    assert "layer3.2.conv2.weight: checkpoint (64, 64, 1, 1), model expects (64, 64, 3, 3)" in message
    assert "missing" not in message, "a tensor of the wrong shape is a mismatch, not also a missing key"


def test_every_problem_is_reported_together():
    state_dict = state_dict_of("B")
    del state_dict["conv1.weight"]
    state_dict["layer4.0.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    state_dict["linear.weight"] = torch.zeros(100, 64)
    state_dict["linear.bias"] = torch.zeros(100)
    message = conversion_error(state_dict, num_classes=10)
    for expected in (
        "conv1.weight (16, 3, 3, 3)",
        "layer4.0.conv1.weight (128, 64, 3, 3)",
        "linear.weight: checkpoint (100, 64), model expects (10, 64)",
        "linear.bias: checkpoint (100,), model expects (10,)",
    ):
        assert expected in message


def test_same_tensor_under_two_names_is_listed():
    """Both classifier names at once (or a key with and without ``module.``) must not let one silently win."""
    state_dict = state_dict_of("A")
    state_dict["fc.weight"] = torch.zeros(10, 64)
    state_dict["module.conv1.weight"] = torch.zeros(16, 3, 3, 3)
    message = conversion_error(state_dict)
    assert "fc.weight (10, 64) (a second tensor for params/fc/kernel)" in message
    assert "module.conv1.weight (16, 3, 3, 3) (a second tensor for params/conv1/kernel)" in message


@pytest.mark.parametrize("depth", [8, 32])
def test_wrong_depth_is_named(depth):
    message = conversion_error(state_dict_of("A"), depth=depth)
    assert f"checkpoint has 3 blocks per group (depth 20), asked for depth {depth}" in message
    assert ("layer1.1.conv1.weight (16, 16, 3, 3)" if depth == 8 else "layer1.3.conv1.weight (16, 16, 3, 3)") in message


def test_shortcut_mismatch_is_named():
    message = conversion_error(state_dict_of("A"), shortcut="B")
    assert "checkpoint has option-A shortcuts, asked for shortcut='B'" in message
    assert "layer2.0.shortcut.0.weight (32, 16, 1, 1)" in message


def test_non_state_dict_is_rejected():
    with pytest.raises(ValueError, match=r"not a state dict: entries \['epoch', 'optimizer'\]"):
        resnet_from_torch({"epoch": 3, "optimizer": {"lr": 0.1}, "conv1.weight": torch.zeros(16, 3, 3, 3)}, 20)


def test_to_torch_lists_variables_that_do_not_fit():
    flat = traverse_util.flatten_dict(random_flax_variables("A"))
    del flat[("batch_stats", "layer3_2", "bn2", "var")]
    flat[("params", "head2", "kernel")] = np.zeros((64, 5), np.float32)
    flat[("params", "layer1_0", "conv1", "kernel")] = np.zeros((3, 3, 16, 8), np.float32)
    with pytest.raises(ValueError) as error:
        resnet_to_torch(traverse_util.unflatten_dict(flat))
    for expected in (
        "batch_stats/layer3_2/bn2/var (64,)",
        "params/head2/kernel (64, 5)",
        "params/layer1_0/conv1/kernel: variables (3, 3, 16, 8), model expects (3, 3, 16, 16)",
    ):
        assert expected in str(error.value)


def test_torch_is_optional():
    """Importing hkt_jax.convert needs no torch; using it without torch says how to get it."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import hkt_jax.convert as convert\n"
        "try:\n    convert.resnet_to_torch({})\nexcept ImportError as error:\n    print(error)\n"
        "try:\n    import hkt_jax.convert.torch_models\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "read or write .pt/.th files: pip install -r requirements-torch.txt" in result.stdout
    assert (
        "torch_models defines PyTorch models and needs PyTorch: pip install -r requirements-torch.txt" in result.stdout
    )


# --- real pretrained checkpoints -----------------------------------------------------------------------------------


def real_reference_images():
    """The 20 lossless CIFAR-10 test images, normalised as recorded with the reference logits, and the record."""
    from PIL import Image

    reference = np.load(shared_data("resnet-cifar10-torch", "reference_logits_cifar10_first20.npz"))
    pngs = sorted(shared_data("cifar-samples").glob("cifar10_*.png"))
    images = np.stack([np.asarray(Image.open(png).convert("RGB")) for png in pngs])
    np.testing.assert_array_equal(images, reference["images_uint8"])
    return ((images / 255.0 - reference["mean"]) / reference["std"]).astype(np.float32), reference


@pytest.mark.parametrize("depth", sorted(REAL_CHECKPOINTS))
def test_real_checkpoint_vs_reference_logits(depth):
    normalised, reference = real_reference_images()
    variables = resnet_from_torch(shared_data("resnet-cifar10-torch", REAL_CHECKPOINTS[depth]), depth)
    logits = flax_logits(variables, normalised, depth=depth)
    assert_logits_match(logits, reference[f"resnet{depth}"])
    assert np.mean(logits.argmax(-1) == reference["labels"]) >= 0.85


def test_library_torch_resnet_reproduces_recorded_logits():
    """torch_models.CifarResNet is the network the akamaster checkpoints were trained and recorded with."""
    normalised, reference = real_reference_images()
    checkpoint = torch.load(
        shared_data("resnet-cifar10-torch", REAL_CHECKPOINTS[20]), map_location="cpu", weights_only=True
    )
    model = TorchCifarResNet(20).eval()
    model.load_state_dict(
        {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}, strict=True
    )
    assert_logits_match(torch_logits(model, normalised), reference["resnet20"])


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_resnet_writes_model_checkpoint_vs_reference(tmp_path, capsys):
    model = reference_model("A")
    source = tmp_path / "resnet20.th"
    torch.save({"best_prec1": 12.5, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, source)
    out = tmp_path / "parent"

    assert main(["resnet", "--src", str(source), "--depth", "20", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    for expected in ("parameters:     269,722", "tensors mapped: 97", "best_prec1: 12.5", str(out)):
        assert expected in summary

    variables, spec = load_model(out)
    assert spec["arch"] == "cifar_resnet"
    assert spec["kwargs"] == {"depth": 20, "num_classes": 10, "shortcut": "A"}
    assert spec["metadata"]["best_prec1"] == 12.5
    images = random_images(2)
    assert_logits_match(flax_logits(variables, images), torch_logits(model, images))


def test_cli_export_torch_round_trip_vs_reference(tmp_path):
    variables = random_flax_variables("B")
    workdir = tmp_path / "run"
    spec = model_spec("cifar_resnet", depth=20, num_classes=10, shortcut="B")
    save_model(workdir / "export" / "child", variables, spec)
    exported = tmp_path / "out" / "child.pt"

    assert main(["export-torch", "--src", str(workdir), "--out", str(exported), "--normalization", "cifar"]) == 0
    saved = torch.load(exported, map_location="cpu", weights_only=True)
    assert saved["spec"]["kwargs"] == {"depth": 20, "num_classes": 10, "shortcut": "B"}
    assert saved["preprocessing"]["std"] == [0.2470, 0.2435, 0.2616]
    model = TorchCifarResNet(20, 10, "B").eval()
    model.load_state_dict(saved["state_dict"], strict=True)
    images = random_images(3)
    assert_logits_match(torch_logits(model, images), flax_logits(variables, images, shortcut="B"))
    loaded, preprocess = load_exported(exported)
    assert preprocess.class_names == tuple(str(label) for label in range(10)), "no run config: labels as names"
    assert_logits_match(torch_logits(loaded, images), flax_logits(variables, images, shortcut="B"))

    assert main(["resnet", "--src", str(exported), "--depth", "20", "--out", str(tmp_path / "back")]) == 0
    assert_trees_bit_identical(load_model(tmp_path / "back")[0], variables)


def test_cli_errors_list_the_problem_without_traceback(tmp_path, capsys):
    source = tmp_path / "resnet20.th"
    torch.save({"state_dict": state_dict_of("A")}, source)
    assert main(["resnet", "--src", str(source), "--depth", "32", "--out", str(tmp_path / "x")]) == 1
    assert "checkpoint has 3 blocks per group (depth 20), asked for depth 32" in capsys.readouterr().err
    assert main(["resnet", "--src", str(source), "--depth", "20", "--out", str(tmp_path)]) == 1  # holds resnet20.th
    assert f"refusing to replace {tmp_path} with a model: it holds resnet20.th" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet20.th"]
    raft = tmp_path / "raft-small.pth"  # princeton-vl's layout: RAFT-S by its 32-channel feature stem
    torch.save({"module.fnet.conv1.weight": torch.zeros(32, 3, 7, 7), "module.update_block.x": torch.zeros(1)}, raft)
    assert main(["resnet", "--src", str(raft), "--depth", "20", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"python -m hkt_jax.convert resnet: error: {raft} looks like a RAFT-S checkpoint (princeton-vl layout), not a "
        f"CIFAR ResNet: use `python -m hkt_jax.convert raft --src {raft} --out DIR`"
    )
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    assert main(["resnet", "--src", str(tmp_path / "other.pt"), "--depth", "20", "--out", str(tmp_path / "x")]) == 1
    assert "not a CIFAR ResNet checkpoint: none of its 1 tensors has a place" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export-torch", "--src", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 1
    assert "neither a model checkpoint dir nor a training workdir" in capsys.readouterr().err
    unfinished = tmp_path / "run"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert main(["export-torch", "--src", str(unfinished), "--out", str(tmp_path / "x.pt")]) == 1
    assert (
        f"{unfinished} is a training workdir without export/child yet: its run has not finished"
        in capsys.readouterr().err
    )
    save_model(unfinished / "best", random_flax_variables("A"), model_spec("cifar_resnet", depth=20))
    assert main(["export-torch", "--src", str(unfinished), "--out", str(tmp_path / "x.pt")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"or export the best network so far: --src {unfinished / 'best'}")
    save_model(tmp_path / "converted", random_flax_variables("A"), model_spec("cifar_resnet", depth=20))
    assert main(["export-torch", "--src", str(tmp_path / "converted"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "cannot tell the input normalisation" in capsys.readouterr().err


def test_cli_help_documents_every_flag():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert {"resnet", "export-torch"} <= set(subcommands)
    for name, subparser in subcommands.items():
        for action in subparser._actions:
            assert action.help, f"{name} {action.option_strings} has no --help text"
