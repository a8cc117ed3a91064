"""Input-pipeline settings; the experiment configs embed them as `config.data` and override fields."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Defaults: the built-in demo data, 224 px, no subset, corrupt files are an error."""
    c = ml_collections.ConfigDict()
    # "demo", "image_folder", or a TFDS name ("imagenet2012_subset/10pct", "cifar100", "dtd", ...).
    c.name = "demo"
    c.split = "upstream_train"  # the training split; `subset` applies to it alone
    c.eval_split = "upstream_test"  # "<split>:rest": the images of `split` that `subset` leaves out
    c.data_dir = None  # TFDS data dir, or the image folder root holding root/<split>/<class>/*.jpg|png
    c.manual_dir = None  # where the ImageNet tar files are, for preparing imagenet2012*
    c.image_size = 224  # output side S; also the size the demo data is generated at
    # None, a fraction in (0, 1] of the split (uniform), or an int number of images per class.
    c.subset = None
    # RandomResizedCrop's smallest area fraction: 0.08 as in the paper; small images need more context.
    c.min_crop_scale = 0.08
    c.subset_seed = 0  # separate from the training seed, so runs with different seeds share one subset
    c.skip_corrupt = False  # False: a corrupt file is an error; True: scan the split once and leave them out
    c.demo_seed = 0
    c.image_key = "image"  # TFDS feature names
    c.label_key = "label"
    c.threads = None  # tf.data private thread pool size; None: TensorFlow's default (all cores)
    c.shuffle_buffer = 10_000  # only for TFDS datasets stored as TFRecord (no random access)
    return c
