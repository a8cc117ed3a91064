"""ScaleKD: torchvision Swin-T -> MobileNetV2, the paper's traditional recipe (config_lib.scalekd_config).

The student's stage maps are features.13 (14x14x96 at 224 px) and features.18 (7x7x1280); the teacher's side is
that of configs/methods/scalekd_swin_t_r18.py. The official MobileNet (v1) config decays the lr on a cosine; the
trainer here has the step schedule of the traditional recipe.

    python -m kdep_jax.main --config=configs/methods/scalekd_swin_t_mnv2.py --workdir=runs/scalekd_swin_t_mnv2 \
        --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.scalekd_config("swin_t", "mobilenet_v2")
    config.scalekd.update(query_sizes=(14, 7), num_heads=(3, 6))
    return config
