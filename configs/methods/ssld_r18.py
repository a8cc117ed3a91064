"""SSLD (PaddleClas): label-free symmetric-KL distillation of the teacher's logits, ResNet-50 -> ResNet-18, with
SSLD's stage-1 recipe where it differs from KDEP's: cosine schedule after a 5-epoch warm-up, 360 epochs.

lr and weight decay are PaddleClas's ResNet50_vd ones (lr 0.4 at batch 1024, scaled linearly to 0.2 at 512; wd
7e-5); PaddleClas gives none for ResNet-18. SSLD's data (ImageNet-1k plus 4M unlabeled ImageNet-22k images picked
by the teacher) is not reproduced: this runs on KDEP's 10% subset, set --config.data.* for more.

python -m kdep_jax.main --config=configs/methods/ssld_r18.py --workdir=runs/ssld_r18 \
    --config.teacher.path=teachers/resnet50 --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.method = "ssld"
    config.teacher.path = "teachers/resnet50"  # converted with its classifier: SSLD distils the logits
    config.student.arch = "resnet18"
    config.train.update(lr=0.2, weight_decay=7e-5, num_epochs=360, schedule="cosine", warmup_epochs=5.0)
    return config
