"""KDEP from a transformer teacher: torchvision's Swin-T (768-d, the pooled final norm) -> ResNet-18 on 10% of
ImageNet-1K.

Swin-T's weights were evaluated with a 232 px bicubic resize before the 224 crop: a pass of the teacher without
augmentation (TCS's coordinates, `--config.method=tcs`) uses that transform; KDEP's statistics use the paper's
training augmentation, as for the ResNet-50 teacher.

python -m kdep_jax.convert import --arch swin_t --input swin_t.pth --output teachers/swin_t
python -m kdep_jax.main --config=configs/r18_swin.py --workdir=runs/r18_swin --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.teacher.update(arch="swin_t", path="teachers/swin_t")
    config.student.arch = "resnet18"
    config.train.lr = 0.3
    config.train.loss_weight = 20.0  # a supervised torchvision teacher, as the paper's 20 for ResNet-50
    return config
