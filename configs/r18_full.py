"""KDEP on 100% of ImageNet-1K, with the alignment statistics of the 10% subset, as the paper does.

Run configs/r18.py first (or point --config.alignment.path at its alignment.npz): the statistics are
tied to the 10% data they were computed on, so that file is reused rather than recomputed.
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.teacher.path = "teachers/resnet50"
    config.student.arch = "resnet18"
    config.train.lr = 0.3
    config.train.loss_weight = 20.0
    config.data.name = "imagenet2012"
    config.alignment.data = config.data.copy_and_resolve_references()
    config.alignment.data.name = "imagenet2012_subset/10pct"
    config.alignment.path = "runs/r18/alignment.npz"
    return config
