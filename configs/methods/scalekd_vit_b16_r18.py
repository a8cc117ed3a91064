"""ScaleKD: torchvision ViT-B/16 -> ResNet-18, the paper's traditional recipe (config_lib.scalekd_config).

Stage split: ViT-B/16 keeps one 14x14 patch grid, so its stages are groups of blocks. Stage 3 ends after block 9
of 12 (features["stage3"]: the feature contract's L/4, L/2, 3L/4 split, which is also the official code's, after
0-based blocks 2, 5, 8, 11), and teacher parameter perception runs blocks 10-12 and the final LayerNorm, the exact
remainder of the layers that make the teacher's final map (there the class token is among the tokens; a
projected student map has none, as in the official code). So the perception sees the last quarter of the
teacher, as with Swin's last stage, and no block twice (the official code runs block 9 again). The projected
layer3 map (14x14x256 -> 14x14 queries of 768) enters those blocks; their 14x14 outputs are the stage-4
projector's queries, which attend to the student's 7x7x512 layer4 map: nothing is interpolated. 12 heads over
768 channels (64 each, ViT-B's own split).

    python -m kdep_jax.convert import --arch vit_b_16 --input vit_b_16-c867db91.pth --output teachers/vit_b_16
    python -m kdep_jax.main --config=configs/methods/scalekd_vit_b16_r18.py --workdir=runs/scalekd_vit_b16_r18 \
        --config.data.manual_dir=~/imagenet
"""
from kdep_jax import config_lib


def get_config():
    config = config_lib.scalekd_config("vit_b_16", "resnet18")
    config.scalekd.update(query_sizes=(14, 14), num_heads=(12, 12))
    return config
