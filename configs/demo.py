"""The whole KDEP pipeline on the built-in demo data, on a laptop CPU in minutes.

Nothing can be downloaded for the demo, so it first trains its own teacher on the demo's upstream classes,
then runs exactly the code path of configs/r18.py: alignment statistics, distillation, export; and finally
fine-tunes the student and a from-scratch network of the same architecture on the small downstream task, to
show what the pre-training is worth. Teacher and student are torchvision ResNet-18s at half width (256-d
features): on a 2-core CPU a thin ResNet-50 (width 0.25, bottlenecks of 16 channels) learned the upstream
task far more slowly than this, and a full-width student would have doubled the demo's time.

    python -m kdep_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m kdep_jax.main --config=configs/demo.py:tiny --workdir=runs/tiny   # seconds, for tests
    # The same with a small ViT teacher (4 px patches, 2 blocks) trained first, distilled into the ResNet-18:
    python -m kdep_jax.main --config=configs/demo.py:tiny_vit --workdir=runs/tiny_vit
    # Every distillation method side by side (same teacher, data, budget and seed), each fine-tuned with 2 seeds:
    python -m kdep_jax.main --config=configs/demo.py:compare --workdir=runs/compare
    # Only the tiny distillation (statistics, distillation, export) from an existing converted teacher,
    # as the multi-process, resume and preemption tests run it:
    python -m kdep_jax.main --config=configs/demo.py:tiny_distill --workdir=runs/td \
        --config.teacher.path=runs/tiny/teacher/model
"""
from kdep_jax import config_lib

IMAGE_SIZE = 32
TEACHER_ARCH, STUDENT_ARCH, WIDTH = "resnet18", "resnet18", 0.5
COMPARE_DISTILL_EPOCHS, COMPARE_DOWNSTREAM_EPOCHS = 5, 20
# ViT-B/16's code at 32 px: 4 px patches (an 8x8 grid), 2 blocks of width 192.
TINY_VIT = dict(image_size=32, patch_size=4, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=384)


def _demo_data(split: str, eval_split: str):
    data_config = config_lib.data_config()
    data_config.min_crop_scale = 0.35  # at 32 px a crop of 8% of the image rarely shows the object
    data_config.name = "demo"
    data_config.split = split
    data_config.eval_split = eval_split
    data_config.image_size = IMAGE_SIZE
    return data_config


def get_config(variant: str = ""):
    variants = ("", "tiny", "tiny_distill", "tiny_vit", "compare", "tiny_compare")
    if variant not in variants:
        raise ValueError(f"configs/demo.py takes no variant or one of {', '.join(':' + v for v in variants[1:])}, "
                         f"not {variant!r}.")
    config = config_lib.kdep_config()
    config.log_every_steps = 10
    config.checkpoint_every_steps = 200
    config.data = _demo_data("upstream_train", "upstream_test")

    teacher = config_lib.supervised_config()
    teacher.name = "teacher"
    teacher.model.arch, teacher.model.width = TEACHER_ARCH, WIDTH
    teacher.data = _demo_data("upstream_train", "upstream_test")
    teacher.train.update(batch_size=128, num_epochs=10, lr=0.1, lr_decay_every_epochs=7)
    teacher.eval_every_epochs = 4
    teacher.log_every_steps = 10
    config.teacher.update(arch=TEACHER_ARCH, width=WIDTH, path="")
    config.teacher.train = teacher

    config.student.update(arch=STUDENT_ARCH, width=WIDTH)
    # The paper's lr 0.3 is for batch 512 on ImageNet; here it stalls the student at the targets' mean (the loss
    # stops at weight x their mean square, and the stalled student fine-tunes worse than scratch). 0.02 learns.
    config.train.update(batch_size=128, num_epochs=10, lr=0.02, lr_decay_every_epochs=7)

    downstream = config_lib.supervised_config()
    downstream.name = "downstream"
    downstream.model.arch, downstream.model.width = STUDENT_ARCH, WIDTH
    downstream.data = _demo_data("downstream_train", "downstream_test")
    downstream.train.update(batch_size=32, num_epochs=30, lr=0.01, lr_decay_every_epochs=20)
    downstream.eval_every_epochs = 10
    downstream.log_every_steps = 5
    config.downstream = downstream

    if variant in ("compare", "tiny_compare"):
        config.mode = "compare"
        # Sized so that 8 pre-trainings and 18 fine-tunings fit in 30 minutes on a 2-core CPU.
        config.train.update(num_epochs=COMPARE_DISTILL_EPOCHS, lr_decay_every_epochs=COMPARE_DISTILL_EPOCHS)
        downstream.train.update(num_epochs=COMPARE_DOWNSTREAM_EPOCHS, lr_decay_every_epochs=COMPARE_DOWNSTREAM_EPOCHS)
        downstream.eval_every_epochs = COMPARE_DOWNSTREAM_EPOCHS
    if variant in ("tiny", "tiny_distill", "tiny_vit", "tiny_compare"):  # every stage, a few steps, 4 images per class
        # Full width, so the exported student is exactly torchvision's resnet18 (the tests load it there).
        teacher.model.width = config.teacher.width = config.student.width = downstream.model.width = 1.0
        for run in (teacher, config, downstream):
            run.train.update(num_epochs=1, batch_size=32)
            run.log_every_steps = 1
            run.checkpoint_every_steps = 2
        teacher.data.subset = config.data.subset = 4
        config.alignment.batch_size = 64
    if variant == "tiny_vit":  # a transformer teacher: torchvision's ViT code, sized for 32 px demo images
        config.teacher.update(arch="vit_b_16", width=1.0)
        config.teacher.overrides.update(TINY_VIT)
        teacher.model.update(arch="vit_b_16", width=1.0)
        teacher.model.overrides.update(TINY_VIT)
        config.student.width = downstream.model.width = 0.25  # 128-d, within the teacher's 192
    if variant == "tiny_distill":  # no teacher training, no transfer: set --config.teacher.path
        config.teacher.train = None
        config.downstream = None
    return config
