"""Function matching (Beyer et al., CVPR 2022; big_vision's distill trainer), ResNet-50 -> ResNet-18, with its
recipe where it differs from KDEP's: AdamW lr 0.03, decoupled weight decay 3e-4 on kernels, gradient clipping at
1.0, a warm-up of 20 epochs (big_vision's 5000 steps at 250 steps per epoch of the 10% subset) then cosine, and
"patience": 1200 epochs (big_vision's batch is 4096; here 512 on KDEP's 10% subset).

python -m kdep_jax.main --config=configs/methods/fm_r18.py --workdir=runs/fm_r18 \
    --config.teacher.path=teachers/resnet50 --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.kdep_config()
    config.method = "fm"
    config.teacher.path = "teachers/resnet50"  # with its classifier: function matching distils the logits
    config.student.arch = "resnet18"
    config.train.update(optimizer="adamw", lr=0.03, weight_decay=3e-4, grad_clip_norm=1.0, schedule="cosine",
                        warmup_epochs=20.0, num_epochs=1200)
    return config
