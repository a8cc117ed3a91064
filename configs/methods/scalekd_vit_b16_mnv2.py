"""ScaleKD: torchvision ViT-B/16 -> MobileNetV2, the paper's traditional recipe (config_lib.scalekd_config).

The teacher's stage split is configs/methods/scalekd_vit_b16_r18.py's; the student's maps are features.13
(14x14x96) and features.18 (7x7x1280).

    python -m kdep_jax.main --config=configs/methods/scalekd_vit_b16_mnv2.py --workdir=runs/scalekd_vit_b16_mnv2 \
        --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.scalekd_config("vit_b_16", "mobilenet_v2")
    config.scalekd.update(query_sizes=(14, 14), num_heads=(12, 12))
    return config
