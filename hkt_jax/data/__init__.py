"""Input pipelines: CIFAR-style classification (grain, channels-last), in-memory arrays, optical flow
(hkt_jax.data.flow_*), CT volumes (hkt_jax.data.volumes, synthetic_ct). All of them are a ``Datasets``
(the protocol a task's ``make_datasets`` returns) on the one shared train stream of ``hkt_jax.data.stream``."""

from hkt_jax.data.flow_augment import AugmentConfig, raft_augment_config
from hkt_jax.data.flow_datasets import FLOW_DATASETS, FlowPairs, open_flow_dataset
from hkt_jax.data.flow_pipeline import flow_eval_batches, make_flow_train_iterator
from hkt_jax.data.pipeline import DataConfig, ImageDatasets, make_datasets
from hkt_jax.data.sources import CIFAR10_CLASSES
from hkt_jax.data.stream import Datasets, ProcessSlice, ResumableIterator, ShardedEpochs, TrainStream
from hkt_jax.data.synthetic_flow import SyntheticFlow

# The train stream's earlier name.
TrainIterator = TrainStream

__all__ = ["AugmentConfig", "CIFAR10_CLASSES", "DataConfig", "Datasets", "FLOW_DATASETS", "FlowPairs",
           "ImageDatasets", "ProcessSlice", "ResumableIterator", "ShardedEpochs", "SyntheticFlow", "TrainIterator",
           "TrainStream", "flow_eval_batches", "make_datasets", "make_flow_train_iterator", "open_flow_dataset",
           "raft_augment_config"]
