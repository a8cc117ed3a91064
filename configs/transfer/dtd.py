"""Transfer to DTD (47 textures) with the paper's recipe."""
from kdep_jax import config_lib


def get_config():
    config = config_lib.supervised_config()
    config.name = "dtd"
    config.data.name = "dtd"
    config.data.split = "train+validation"
    config.data.eval_split = "test"
    return config
