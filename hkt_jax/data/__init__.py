"""Input pipelines: CIFAR-style classification (grain, channels-last), in-memory arrays, optical flow
(hkt_jax.data.flow_*), CT volumes (hkt_jax.data.volumes, synthetic_ct)."""

from hkt_jax.data.flow_augment import AugmentConfig, raft_augment_config
from hkt_jax.data.flow_datasets import FLOW_DATASETS, FlowPairs, open_flow_dataset
from hkt_jax.data.flow_pipeline import flow_eval_batches, make_flow_train_iterator
from hkt_jax.data.pipeline import DataConfig, Datasets, TrainIterator, make_datasets
from hkt_jax.data.sources import CIFAR10_CLASSES
from hkt_jax.data.synthetic_flow import SyntheticFlow

__all__ = ["AugmentConfig", "CIFAR10_CLASSES", "DataConfig", "Datasets", "FLOW_DATASETS", "FlowPairs",
           "SyntheticFlow", "TrainIterator", "flow_eval_batches", "make_datasets", "make_flow_train_iterator",
           "open_flow_dataset", "raft_augment_config"]
