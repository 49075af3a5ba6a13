"""A trained hkt_jax CIFAR ResNet child in plain PyTorch: network, preprocessing and loader in one file.

``python -m hkt_jax.convert export-torch`` copies this file beside the weights it writes, so
a deployment box needs only ``torch`` and ``numpy`` (no jax, no hkt_jax):

    from hkt_cifar_resnet import load
    model, preprocess = load("child.pt")
    logits = model(preprocess(images_uint8_nhwc))

``CifarResNet`` is akamaster/pytorch_resnet_cifar10's ``resnet.py`` (BSD-2-Clause,
Copyright (c) 2018 Yerlan Idelbayev) with the option-B projection shortcut the
distillation repos use; ``RawImageClassifier`` puts the preprocessing inside the
network (uint8 NHWC in, logits out: what ``export-onnx`` traces). Inside hkt_jax
this file is ``hkt_jax.convert.hkt_cifar_resnet``; it must never import jax or hkt_jax.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# What an exported .pt file holds besides the weights (see hkt_jax.convert.__main__.export_torch).
EXPORT_FORMAT = "hkt_jax.export-torch/1"


# --- akamaster CIFAR ResNet --------------------------------------------------------------------------------------


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: every other pixel, zero channels padded on both sides (akamaster's LambdaLayer)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = OptionAShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images, NCHW; the PyTorch twin of ``hkt_jax.models.CifarResNet``."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = (depth - 2) // 6
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, blocks, 1, shortcut)
        self.layer2 = self._make_layer(32, blocks, 2, shortcut)
        self.layer3 = self._make_layer(64, blocks, 2, shortcut)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).flatten(1)
        return self.linear(out)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """RGB image(s) -> the float32 NCHW batch the exported network was trained on: ``(x / 255 - mean) / std``.

    Takes a PIL image (converted to RGB and resized to ``image_size`` when it differs),
    or uint8 RGB pixels in [0, 255] as an (H, W, 3) or (N, H, W, 3) array.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]  # (height, width) the network was trained on
    class_names: tuple[str, ...]

    def __call__(self, image: Any) -> torch.Tensor:
        if hasattr(image, "convert"):  # a PIL image
            image = image.convert("RGB")
            height, width = self.image_size
            if image.size != (width, height):
                image = image.resize((width, height), resample=2)  # PIL.Image.BILINEAR
            image = np.asarray(image)
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != 3 or pixels.ndim not in (3, 4):
            raise ValueError(f"expected uint8 RGB pixels (H, W, 3) or (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
        batch = pixels[None] if pixels.ndim == 3 else pixels
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        normalised = (batch.astype(np.float32) / np.float32(255.0) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Preprocess:
        if record.get("layout") != "NCHW" or record.get("input_range") != [0, 255]:
            raise ValueError(f"unsupported preprocessing record {record}: expected layout NCHW, input_range [0, 255]")
        return cls(
            tuple(record["mean"]), tuple(record["std"]), tuple(record["image_size"]), tuple(record["class_names"])
        )


class RawImageClassifier(nn.Module):
    """uint8 RGB ``(N, H, W, 3)`` -> logits: ``(x / 255 - mean) / std``, NHWC -> NCHW, then the network."""

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        std = torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", 1 / (255 * std))  # the training pipeline's one multiply-add
        self.register_buffer("offset", -torch.tensor(mean, dtype=torch.float32) / std)

    def forward(self, images):
        normalised = images.to(torch.float32) * self.scale + self.offset
        return self.network(normalised.permute(0, 3, 1, 2))


def load(path: str | os.PathLike, *, map_location: str = "cpu") -> tuple[CifarResNet, Preprocess]:
    """An ``export-torch`` file -> (network in eval mode, loaded with ``strict=True``; its ``Preprocess``)."""
    exported = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(exported, dict) or exported.get("format") != EXPORT_FORMAT:
        found = sorted(exported) if isinstance(exported, dict) else type(exported).__name__
        raise ValueError(
            f"{path} is not a {EXPORT_FORMAT} file (found {found}); "
            "write it with python -m hkt_jax.convert export-torch"
        )
    torch_model = exported["torch_model"]
    if torch_model["arch"] != "cifar_resnet":
        raise ValueError(f"{path}: holds a {torch_model['arch']!r} network; this file defines 'cifar_resnet'")
    model = CifarResNet(**torch_model["kwargs"])
    model.load_state_dict(exported["state_dict"], strict=True)
    return model.eval(), Preprocess.from_record(exported["preprocessing"])
