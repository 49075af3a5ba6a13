"""Weight converters between PyTorch checkpoints and hkt_jax model checkpoints.

torch is optional: it is imported only when a converter reads or writes PyTorch tensors.
"""

from hkt_jax.convert.raft import raft_from_torch, raft_to_torch
from hkt_jax.convert.resnet import resnet_from_torch, resnet_to_torch
from hkt_jax.convert.unet import unet_from_torch, unet_to_torch

__all__ = [
    "raft_from_torch",
    "raft_to_torch",
    "resnet_from_torch",
    "resnet_to_torch",
    "unet_from_torch",
    "unet_to_torch",
]
