"""KDEP from a transformer teacher: torchvision's ViT-B/16 (768-d class token) -> ResNet-18 on 10% of ImageNet-1K.

The feature distilled is the class token after the final LayerNorm, the one ViT's head classifies (see
kdep_jax.models). The alignment statistics use the paper's training augmentation, as for the ResNet-50 teacher.

python -m kdep_jax.convert import --arch vit_b_16 --input vit_b_16.pth --output teachers/vit_b_16
python -m kdep_jax.main --config=configs/r18_vit.py --workdir=runs/r18_vit --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.teacher.update(arch="vit_b_16", path="teachers/vit_b_16")
    config.student.arch = "resnet18"
    config.train.lr = 0.3
    config.train.loss_weight = 20.0  # a supervised torchvision teacher, as the paper's 20 for ResNet-50
    return config
