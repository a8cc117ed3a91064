"""Transfer to CIFAR-100 with the paper's recipe: fine-tune everything, SGD 150 epochs, lr 0.001 x0.1 every 50.

python -m kdep_jax.main --config=configs/transfer/cifar100.py --workdir=runs/cifar100_kdep \
    --config.init=kdep:runs/r18
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.supervised_config()
    config.name = "cifar100"
    config.data.name = "cifar100"
    config.data.split = "train"
    config.data.eval_split = "test"
    return config
