"""KDEP: torchvision ResNet-50 -> MobileNetV2 (k = 1280) on 10% of ImageNet-1K, lr 0.1."""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.teacher.path = "teachers/resnet50"
    config.student.arch = "mobilenet_v2"
    config.train.lr = 0.1
    config.train.loss_weight = 20.0
    return config
