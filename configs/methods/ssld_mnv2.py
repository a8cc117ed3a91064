"""SSLD (PaddleClas), ResNet-50 -> MobileNetV2, with SSLD's stage-1 MobileNetV2 recipe where it differs from
KDEP's: lr 0.54 at batch 3072 (scaled linearly to 0.09 at 512), weight decay 1e-5, cosine schedule after a 5-epoch
warm-up, 360 epochs. On KDEP's 10% subset, not SSLD's 5M images (see ssld_r18.py).

python -m kdep_jax.main --config=configs/methods/ssld_mnv2.py --workdir=runs/ssld_mnv2 \
    --config.teacher.path=teachers/resnet50 --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.method = "ssld"
    config.teacher.path = "teachers/resnet50"
    config.student.arch = "mobilenet_v2"
    config.train.update(lr=0.09, weight_decay=1e-5, num_epochs=360, schedule="cosine", warmup_epochs=5.0)
    return config
