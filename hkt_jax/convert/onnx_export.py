"""``export-onnx``: a child's PyTorch twin, preprocessing inside, traced to ONNX.

Children with a PyTorch twin in the library: the CIFAR ResNet (``hkt_cifar_resnet.CifarResNet``),
RAFT / RAFT-S (torchvision's ``raft_large`` / ``raft_small``, the layout ``raft_to_torch`` writes) and
PocketNet / U-Net (``torch_unet.TorchUNet``, the layout ``unet_to_torch`` writes; DenseUNet has none).
The graph takes the same raw inputs as ``export-stablehlo`` (``hkt_jax.convert.deploy``) and returns
the same output; the batch axis is dynamic. Traced with PyTorch's TorchScript exporter
(``dynamo=False``), which needs no network and no onnxscript; RAFT's refinement loop is unrolled
at the export's fixed iteration count.

Needs PyTorch (and torchvision for RAFT); checking the file needs ``onnxruntime``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hkt_jax.convert.deploy import Deployable
from hkt_jax.convert.raft import raft_to_torch
from hkt_jax.convert.resnet import require_torch, resnet_config, resnet_to_torch
from hkt_jax.convert.unet import unet_to_torch
from hkt_jax.models.registry import build_model

FORMAT = "hkt_jax.export-onnx/1"
OPSET = 17  # GridSample (RAFT's correlation lookup) needs 16
ONNX_ARCHS = ("cifar_resnet", "raft", "pocketnet", "unet")
TORCHVISION_MIN_FRAME = 128


def _classifier(deployable: Deployable):
    torch = require_torch()
    from hkt_jax.convert.hkt_cifar_resnet import CifarResNet, RawImageClassifier

    network = CifarResNet(**resnet_config(deployable.variables))
    network.load_state_dict(resnet_to_torch(deployable.variables), strict=True)
    record = deployable.preprocessing
    return RawImageClassifier(network.eval(), record["mean"], record["std"]).eval(), torch


def _flow(deployable: Deployable):
    torch = require_torch()
    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as error:
        raise ImportError(
            "export-onnx of RAFT needs torchvision (its raft_small / raft_large are the PyTorch "
            "twin): pip install -r requirements-torch.txt"
        ) from error

    if min(deployable.preprocessing["frame_size"]) < TORCHVISION_MIN_FRAME:
        raise ValueError(
            f"torchvision's RAFT (the ONNX twin) needs frames of at least {TORCHVISION_MIN_FRAME}x"
            f"{TORCHVISION_MIN_FRAME} (its correlation pyramid), got --frame_size "
            f"{deployable.preprocessing['frame_size']}; export-stablehlo takes frames from 64x64"
        )
    small = bool(deployable.spec["kwargs"].get("small", False))
    network = (raft_small if small else raft_large)(weights=None, progress=False)
    network.load_state_dict(raft_to_torch(deployable.variables, small=small), strict=True)
    iters = int(deployable.preprocessing["iters"])

    class RawFrameFlow(torch.nn.Module):
        """uint8 RGB frames ``(N, H, W, 3)`` -> the last iteration's flow ``(N, H, W, 2)``."""

        def __init__(self):
            super().__init__()
            self.raft = network.eval()

        def forward(self, image1, image2):
            frames = [2 * (image.to(torch.float32).permute(0, 3, 1, 2) / 255.0) - 1 for image in (image1, image2)]
            return self.raft(*frames, num_flow_updates=iters)[-1].permute(0, 2, 3, 1)

    return RawFrameFlow().eval(), torch


def _segmenter(deployable: Deployable):
    torch = require_torch()
    from hkt_jax.convert.torch_unet import RawSliceSegmenter, TorchUNet

    model = build_model(deployable.spec)
    network = TorchUNet(model.level_widths, model.bottleneck_width, model.in_channels, model.num_classes)
    network.load_state_dict(unet_to_torch(deployable.variables, model), strict=True)
    return RawSliceSegmenter(network.eval(), deployable.preprocessing["window"]).eval(), torch


BUILDERS = {"cifar_resnet": _classifier, "raft": _flow, "pocketnet": _segmenter, "unet": _segmenter}
OUTPUT_NAMES = {"cifar_resnet": "logits", "raft": "flow", "pocketnet": "logits", "unet": "logits"}


def export_onnx(deployable: Deployable, out: str | Path, *, opset: int = OPSET) -> Path:
    """Trace the twin of ``deployable`` to ``out`` (and its description to ``out`` with ``.json``)."""
    if deployable.arch not in ONNX_ARCHS:
        raise ValueError(
            f"export-onnx covers {ONNX_ARCHS} (the children with a PyTorch twin in hkt_jax); "
            f"{deployable.arch!r} has none: use export-stablehlo"
        )
    module, torch = BUILDERS[deployable.arch](deployable)
    examples = tuple(torch.zeros((2, *spec.shape[1:]), dtype=getattr(torch, spec.dtype)) for spec in deployable.inputs)
    names = [spec.name for spec in deployable.inputs]
    output = OUTPUT_NAMES[deployable.arch]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            examples,
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[output],
            dynamic_axes={name: {0: "batch"} for name in [*names, output]},
        )
    description = {"format": FORMAT, **deployable.describe(), "opset": opset, "output_name": output}
    out.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return out


def run_onnx(path: str | Path, *inputs: np.ndarray) -> np.ndarray:
    """The ONNX file's output on ``inputs`` with onnxruntime (CPU)."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("running an ONNX export needs onnxruntime: pip install -r requirements-test.txt") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: np.asarray(x) for arg, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]
