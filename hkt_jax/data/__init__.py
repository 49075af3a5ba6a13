"""CIFAR-style classification input pipeline (grain, channels-last)."""

from hkt_jax.data.pipeline import DataConfig, Datasets, TrainIterator, make_datasets
from hkt_jax.data.sources import CIFAR10_CLASSES

__all__ = ["CIFAR10_CLASSES", "DataConfig", "Datasets", "TrainIterator", "make_datasets"]
