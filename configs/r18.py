"""KDEP, the paper's recipe: torchvision ResNet-50 -> ResNet-18 on 10% of ImageNet-1K.

python -m kdep_jax.main --config=configs/r18.py --workdir=runs/r18 \
    --config.teacher.path=teachers/resnet50 --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.teacher.path = "teachers/resnet50"  # python -m kdep_jax.convert import --arch resnet50 ...
    config.student.arch = "resnet18"
    config.train.lr = 0.3
    config.train.loss_weight = 20.0  # standard supervised teacher (torchvision's weights)
    return config
