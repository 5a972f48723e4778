"""Datasets for tfflows: uint8 image pipelines, the embedded offline MNIST set, ImageNet npz
batches and TFDS sources. See `pipeline.make_dataset`."""

from tfflows.data.embedded import load_embedded
from tfflows.data.pipeline import DATASETS
from tfflows.data.pipeline import dataset_info
from tfflows.data.pipeline import make_dataset
from tfflows.data.pipeline import num_examples

__all__ = ['DATASETS', 'dataset_info', 'load_embedded', 'make_dataset', 'num_examples']
