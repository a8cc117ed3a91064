"""Transfer to CUB-200-2011 (TFDS caltech_birds2011) with the paper's recipe; the paper also reports lr 0.01."""
from kdep_jax import config_lib


def get_config():
    config = config_lib.supervised_config()
    config.name = "cub200"
    config.data.name = "caltech_birds2011"
    config.data.split = "train"
    config.data.eval_split = "test"
    config.train.lr = 0.01
    return config
