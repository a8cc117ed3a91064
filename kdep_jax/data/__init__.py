"""Input pipeline: demo data, image folders and TFDS -> deterministic, sharded NHWC float batches."""

from kdep_jax.data.errors import DataError
from kdep_jax.data.pipeline import DatasetInfo, dataset_info, eval_batches, train_batches
from kdep_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DataError",
    "DatasetInfo",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "dataset_info",
    "eval_batches",
    "train_batches",
]
