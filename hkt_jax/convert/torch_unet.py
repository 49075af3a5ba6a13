"""The PyTorch twin of ``hkt_jax.models.UNet`` / ``PocketNet``: module names as milesial/Pytorch-UNet
(``bilinear=False``), the layout ``hkt_jax.convert.unet`` reads and writes, so a converted state dict
loads with ``strict=True``. ``RawSliceSegmenter`` puts the CT preprocessing inside (Hounsfield units
in, class logits out): what ``export-onnx`` traces for segmentation children.

Imports only torch (and needs nothing else from hkt_jax); ``tests/test_unet.py`` keeps its own
independent copy as the converters' reference.
"""

from __future__ import annotations

import torch
from torch import nn


class DoubleConv(nn.Module):
    """(3x3 conv, no bias - BatchNorm - ReLU) x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """2x2 stride-2 transposed conv, [skip, upsampled] concatenated (skip first), double conv."""

    def __init__(self, cin: int, skip: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, skip, 2, stride=2)
        self.conv = DoubleConv(2 * skip, skip)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutConv(nn.Module):
    def __init__(self, cin: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


class TorchUNet(nn.Module):
    """U-Net with level ``widths`` (top first) and a ``bottleneck`` width; NCHW in, NCHW logits out."""

    def __init__(self, widths, bottleneck: int, in_channels: int = 1, num_classes: int = 3):
        super().__init__()
        depth = len(widths)
        if depth < 1 or min(widths) < 1 or bottleneck < 1:
            raise ValueError(f"TorchUNet: widths and bottleneck must be positive, got {widths} and {bottleneck}")
        self.depth = depth
        self.inc = DoubleConv(in_channels, widths[0])
        channels = [*widths, bottleneck]
        for k in range(1, depth + 1):
            setattr(self, f"down{k}", Down(channels[k - 1], channels[k]))
        for k in range(1, depth + 1):  # up1 is the deepest decoder level
            setattr(self, f"up{k}", Up(channels[depth - k + 1], widths[depth - k]))
        self.outc = OutConv(widths[0], num_classes)

    def forward(self, x):
        skips = [self.inc(x)]
        for k in range(1, self.depth + 1):
            skips.append(getattr(self, f"down{k}")(skips[-1]))
        x = skips.pop()
        for k in range(1, self.depth + 1):
            x = getattr(self, f"up{k}")(x, skips.pop())
        return self.outc(x)


class RawSliceSegmenter(nn.Module):
    """CT slices in Hounsfield units ``(N, H, W)`` -> class logits ``(N, H, W, classes)``: the HU window
    clipped and scaled to [0, 1] (``hkt_jax.data.volumes.window_hu``), then the network."""

    def __init__(self, network: nn.Module, window: tuple[float, float]):
        super().__init__()
        self.network = network
        self.low, self.high = (float(v) for v in window)
        if not self.high > self.low:
            raise ValueError(f"HU window must have high > low, got {window}")

    def forward(self, hu):
        x = (hu.to(torch.float32).clamp(self.low, self.high) - self.low) / (self.high - self.low)
        return self.network(x[:, None]).permute(0, 2, 3, 1)
