"""Staged Linen models: every model exposes ``stage_names`` and ``stage(i, x, train=...)``."""

from hkt_jax.models.cifar_resnet import CifarResNet
from hkt_jax.models.raft import RAFT
from hkt_jax.models.registry import ARCHITECTURES, build_model, model_spec, parameter_count
from hkt_jax.engine.stages import StagedModel, apply_stage, check_staged, run_all_stages
from hkt_jax.models.toy import ToyStagedNet
from hkt_jax.models.unet import DenseUNet, PocketNet, UNet
from hkt_jax.models.tapped import Tapped, available_taps, tapped_boundaries

__all__ = [
    "ARCHITECTURES",
    "CifarResNet",
    "DenseUNet",
    "PocketNet",
    "RAFT",
    "UNet",
    "StagedModel",
    "ToyStagedNet",
    "apply_stage",
    "build_model",
    "check_staged",
    "model_spec",
    "parameter_count",
    "run_all_stages",
    "Tapped",
    "available_taps",
    "tapped_boundaries",
]
