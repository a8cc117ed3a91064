"""Input pipeline: demo data, image folders and TFDS -> deterministic, sharded NHWC float batches.

The pipeline's modules import TensorFlow (tf.data, TFDS), which takes about 0.5 GiB of memory and seconds to
import, so they are imported when first used: code that only needs models, teachers' weights or checkpoints
does not pay for them.
"""
import importlib

from kdep_jax.data.errors import DataError
from kdep_jax.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

_PIPELINE = ("DatasetInfo", "dataset_info", "eval_batches", "train_batches")

__all__ = ["DataError", "IMAGENET_MEAN", "IMAGENET_STD", *_PIPELINE]


def __getattr__(name: str):
    if name in _PIPELINE:
        return getattr(importlib.import_module("kdep_jax.data.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
