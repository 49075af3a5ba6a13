"""Staged Linen models: every model exposes ``stage_names`` and ``stage(i, x, train=...)``."""

from hkt_jax.models.cifar_resnet import CifarResNet
from hkt_jax.models.registry import ARCHITECTURES, build_model, model_spec
from hkt_jax.models.staged import StagedModel, apply_stage, check_staged, run_all_stages
from hkt_jax.models.toy import ToyStagedNet

__all__ = ["ARCHITECTURES", "CifarResNet", "build_model", "model_spec", "StagedModel", "ToyStagedNet", "apply_stage", "check_staged", "run_all_stages"]
