"""ScaleKD: torchvision Swin-T -> ResNet-18, the paper's traditional recipe (config_lib.scalekd_config).

Teacher stage 3 is torchvision's features.5 (14x14x384 at 224 px); teacher parameter perception runs the
projected student layer3 map through features.6 (PatchMerging), features.7 and norm (7x7x768), which the projected
layer4 map (7x7x512) is compared with as well. The projectors use 3 and 6 heads, as the official Swin-S config for
the same widths.

    python -m kdep_jax.convert import --arch swin_t --input swin_t-704ceda3.pth --output teachers/swin_t
    python -m kdep_jax.main --config=configs/methods/scalekd_swin_t_r18.py --workdir=runs/scalekd_swin_t_r18 \
        --config.data.manual_dir=~/imagenet
    # Label-free pre-training on any images: --config.scalekd.labels=False
    # tiny: a small Swin at 64 px on the demo data for a few steps (tests/test_scalekd.py makes the teacher):
    python -m kdep_jax.main --config=configs/methods/scalekd_swin_t_r18.py:tiny --workdir=runs/scalekd_tiny \
        --config.teacher.path=TINY_TEACHER
"""
from kdep_jax import config_lib

# The same Swin code, small: at 64 px its stage-3 and stage-4 maps are 4x4x64 and 2x2x128, as a quarter-width
# ResNet-18's layer3 and layer4 (the test suite's small Swin, tests/test_transformers.py).
TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(2, 2, 4, 4))


def get_config(variant: str = ""):
    if variant not in ("", "tiny"):
        raise ValueError(f"configs/methods/scalekd_swin_t_r18.py takes no variant or :tiny, not {variant!r}.")
    config = config_lib.scalekd_config("swin_t", "resnet18")
    config.scalekd.update(query_sizes=(14, 7), num_heads=(3, 6))
    if variant == "tiny":  # its teacher classifies the demo's 38 upstream classes, so the CE term runs too
        config.teacher.overrides = TINY_SWIN
        config.teacher.path = ""
        config.student.width = 0.25
        config.data = config_lib.data_config()
        config.data.update(name="demo", split="upstream_train", eval_split="upstream_test", image_size=64, subset=4,
                           min_crop_scale=0.35)
        config.scalekd.update(query_sizes=(4, 2), num_heads=(2, 4))
        config.train.update(batch_size=32, num_epochs=1, lr=0.02)
        config.log_every_steps = 1
    return config
