"""Weight converters between PyTorch checkpoints and hkt_jax model checkpoints.

torch is optional: it is imported only when a converter reads or writes PyTorch tensors.
"""

from hkt_jax.convert.resnet import resnet_from_torch, resnet_to_torch

__all__ = ["resnet_from_torch", "resnet_to_torch"]
