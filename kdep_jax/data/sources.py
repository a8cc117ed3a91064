"""Where examples come from: the demo data, scikit-image's photos and faces, image folders, and TFDS, each
opened as an indexable split.

Random access (read example i) lets the pipeline choose the order and the sharding itself, which is what
makes batches a function of (seed, step) alone. TFDS datasets stored as TFRecord cannot be read by index;
they open as a `SequentialSource` instead (see sequential.py).
"""

import dataclasses
import os
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from kdep_jax.data import photos
from kdep_jax.data.errors import DataError
from kdep_jax.data.transforms import decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass(frozen=True)
class Source:
    """One split, readable by example index."""

    num_examples: int
    num_classes: int
    # int64 scalar tensor -> (uint8 (H, W, 3) image, int32 label); traceable, also callable eagerly.
    read: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    labels: Callable[[], np.ndarray]  # all labels, for per-class subsets (may read the whole split)
    describe: Callable[[int], str]  # "file /x/y.jpg": how an error message names example i


@dataclasses.dataclass(frozen=True)
class SequentialSource:
    """A TFDS split stored as TFRecord: readable only in file order."""

    builder: tfds.core.DatasetBuilder
    split: str
    num_examples: int
    num_classes: int
    image_key: str
    label_key: str


def open_source(cfg, split: str) -> Source | SequentialSource:
    """Opens `split` of the dataset named by `cfg.name` (see config.py)."""
    if cfg.name == "demo":
        return _demo(split, cfg.image_size, cfg.demo_seed)
    if cfg.name == "photo_patches":
        return _photo_patches(split, cfg.demo_seed)
    if cfg.name == "lfw_subset":
        return _lfw_subset(split)
    if cfg.name == "image_folder":
        return _folder(cfg.data_dir, split, cfg.split)
    return _tfds(cfg, split)


def _demo(split, image_size, seed):
    from kdep_jax.data import demo  # pylint: disable=import-outside-toplevel

    if split not in demo.SPLITS:
        raise DataError(
            f"The demo data has no split {split!r}; set config.data.split / eval_split to one of {demo.SPLITS}."
        )
    images, labels = demo.load(split, image_size=image_size, seed=seed)
    images_t, labels_t = tf.constant(images), tf.constant(labels, tf.int32)
    return Source(
        num_examples=len(labels),
        num_classes=demo.num_classes(split),
        read=lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i)),
        labels=lambda: np.asarray(labels),
        describe=lambda i: f"demo {split} example {i}",
    )


def _photo_patches(split, seed):
    """Unlabeled crops of scikit-image's photos (photos.py), cut from the photos when read: the photos are held
    once (19 MB, flattened), each example is a row of the box table."""
    boxes = photos.patch_boxes(split, seed)
    images = photos.photos()
    pixels_t = tf.constant(np.concatenate([image.ravel() for image in images]))
    offsets_t = tf.constant(np.cumsum([0] + [image.size for image in images[:-1]]), tf.int64)
    shapes_t = tf.constant([image.shape for image in images], tf.int64)
    boxes_t = tf.constant(boxes)

    def read(i):
        photo, top, left, height, width = tf.unstack(tf.gather(boxes_t, i))
        shape = tf.gather(shapes_t, photo)
        start = tf.gather(offsets_t, photo)
        image = tf.reshape(pixels_t[start:start + tf.reduce_prod(shape)], shape)
        return image[top:top + height, left:left + width], tf.constant(0, tf.int32)

    return Source(
        num_examples=len(boxes),
        num_classes=0,
        read=read,
        labels=lambda: np.zeros(len(boxes), np.int32),
        describe=lambda i: f"photo_patches {split} example {i} ({photos.PHOTOS[boxes[i][0]]} {boxes[i][1:].tolist()})",
    )


def _lfw_subset(split):
    photos.check_split("lfw_subset", split, photos.LFW_SPLITS)
    images, labels = photos.lfw_subset()
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    return Source(
        num_examples=len(labels),
        num_classes=len(photos.LFW_CLASSES),
        read=lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i)),
        labels=lambda: np.asarray(labels),
        describe=lambda i: f"lfw_subset example {i}",
    )


def _folder(root, split, train_split):
    """root/split/class/*.jpg|png; the label space is the sorted class folders of the training split.

    A split folder that holds images and no class folders is unlabeled (num_classes 0, every label 0): enough
    for distillation, which needs no labels.
    """
    if not root:
        raise DataError(
            "config.data.name='image_folder' needs config.data.data_dir: the folder holding <split>/<class>/*.jpg|png "
            "(or <split>/*.jpg|png for unlabeled images)."
        )
    split_dir = os.path.join(root, split)
    if _is_unlabeled(split_dir):
        files = [os.path.join(split_dir, f) for f in _image_files(split_dir)]
        paths_t = tf.constant(files)
        return Source(
            num_examples=len(files),
            num_classes=0,
            read=lambda i: (decode(tf.io.read_file(tf.gather(paths_t, i))), tf.constant(0, tf.int32)),
            labels=lambda: np.zeros(len(files), np.int32),
            describe=lambda i: f"file {files[i]}",
        )
    classes = _class_folders(root, train_split)
    present = _class_folders(root, split) if split != train_split else classes
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(
            f"Image folder {split_dir} has class folders that the training split "
            f"{os.path.join(root, train_split)} lacks: {unknown[:5]}. Both splits must use the "
            "same class folder names."
        )
    files, labels = [], []
    for name in present:
        class_dir = os.path.join(split_dir, name)
        images = _image_files(class_dir)
        if not images:
            raise DataError(
                f"Class folder {class_dir} has no images (*{'|*'.join(IMAGE_EXTENSIONS)}). "
                "Add images or remove the folder."
            )
        files += [os.path.join(class_dir, f) for f in images]
        labels += [classes.index(name)] * len(images)
    paths_t, labels_t = tf.constant(files), tf.constant(labels, tf.int32)
    labels_np = np.asarray(labels, np.int32)
    return Source(
        num_examples=len(files),
        num_classes=len(classes),
        read=lambda i: (decode(tf.io.read_file(tf.gather(paths_t, i))), tf.gather(labels_t, i)),
        labels=lambda: labels_np,
        describe=lambda i: f"file {files[i]}",
    )


def _image_files(directory):
    return sorted(
        f for f in tf.io.gfile.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def _is_unlabeled(split_dir) -> bool:
    """Images directly in the split folder, and no class folders."""
    if not tf.io.gfile.isdir(split_dir):
        return False
    entries = tf.io.gfile.listdir(split_dir)
    has_folders = any(tf.io.gfile.isdir(os.path.join(split_dir, e)) and not e.startswith(".") for e in entries)
    return not has_folders and bool(_image_files(split_dir))


def _class_folders(root, split):
    split_dir = os.path.join(root, split)
    if not tf.io.gfile.isdir(split_dir):
        raise DataError(
            f"Image folder split {split_dir} does not exist. Expected the layout "
            f"{os.path.join(root, '<split>', '<class>', '*.jpg')}; check config.data.data_dir "
            "and config.data.split / eval_split."
        )
    classes = sorted(
        d.rstrip("/")
        for d in tf.io.gfile.listdir(split_dir)
        if tf.io.gfile.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
    )
    if not classes:
        raise DataError(f"Image folder split {split_dir} is empty: it must hold one sub-folder of images per class.")
    return classes


def _tfds(cfg, split):
    try:
        builder = tfds.builder(cfg.name, data_dir=cfg.data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(
            f"Unknown dataset config.data.name={cfg.name!r}: use 'demo', 'photo_patches', 'lfw_subset', 'image_folder', "
            f"or a TFDS name such as 'imagenet2012_subset/10pct' or 'cifar100'. ({e})"
        ) from None
    if not builder.is_prepared():
        raise DataError(_not_prepared_message(cfg, builder))
    num_classes = builder.info.features[cfg.label_key].num_classes
    try:
        records = builder.as_data_source(split=split, decoders={cfg.image_key: tfds.decode.SkipDecoding()})
    except NotImplementedError:  # prepared as TFRecord: no random access
        return _tfds_sequential(cfg, builder, split, num_classes)
    except (KeyError, ValueError) as e:
        raise DataError(
            f"TFDS dataset {cfg.name!r} has no split {split!r} ({e}); available: {list(builder.info.splits)}."
        ) from None

    def fetch(i):
        example = records[int(i)]
        return example[cfg.image_key], np.int32(example[cfg.label_key])

    def read(i):
        encoded, label = tf.numpy_function(fetch, [i], (tf.string, tf.int32), stateful=False)
        return decode(encoded), tf.ensure_shape(label, [])

    def labels():
        n, chunk = len(records), 1024
        out = []
        for start in tqdm.tqdm(range(0, n, chunk), desc=f"reading {cfg.name} {split} labels", unit="chunk"):
            out += [ex[cfg.label_key] for ex in records.__getitems__(list(range(start, min(n, start + chunk))))]
        return np.asarray(out, np.int32)

    return Source(
        num_examples=len(records),
        num_classes=num_classes,
        read=read,
        labels=labels,
        describe=lambda i: f"record {i} of TFDS {cfg.name} split {split}",
    )


def _tfds_sequential(cfg, builder, split, num_classes):
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise DataError(
            f"TFDS dataset {cfg.name!r} has no split {split!r} ({e}); available: {list(builder.info.splits)}."
        ) from None
    logging.warning(
        "TFDS %s is stored as TFRecord, which has no random access: reading it sequentially with a "
        "seeded shuffle. Batches are deterministic for a given process count, but not identical across "
        "process counts, and resuming re-reads (without decoding) the skipped records. For exact "
        "(seed, step) batches convert it once: tfds convert_format --dataset_version_dir=%s "
        "--out_file_format=array_record",
        cfg.name,
        builder.data_path,
    )
    return SequentialSource(
        builder=builder,
        split=split,
        num_examples=num_examples,
        num_classes=num_classes,
        image_key=cfg.image_key,
        label_key=cfg.label_key,
    )


def _not_prepared_message(cfg, builder):
    data_dir = f" --data_dir={cfg.data_dir}" if cfg.data_dir else ""
    if cfg.name.startswith("imagenet2012"):
        manual_dir = cfg.manual_dir or "<MANUAL_DIR>"
        return (
            f"TFDS dataset {cfg.name!r} is not prepared (expected at {builder.data_path}). ImageNet "
            "cannot be downloaded automatically: download ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar from https://image-net.org (free account), put both in one "
            "directory, set config.data.manual_dir to it, and prepare the dataset once with:\n"
            f"  tfds build {cfg.name}{data_dir} --manual_dir={manual_dir} --file_format=array_record"
        )
    return (
        f"TFDS dataset {cfg.name!r} is not prepared (expected at {builder.data_path}) and this "
        "pipeline never downloads. Prepare it once, on a machine with internet access, with:\n"
        f"  tfds build {cfg.name}{data_dir} --file_format=array_record\n"
        "then copy the data directory here and set config.data.data_dir to it."
    )
