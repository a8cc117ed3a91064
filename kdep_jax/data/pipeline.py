"""Batches for training and evaluation: index-based tf.data pipelines over the sources.

Training (random-access sources): epoch e = t // examples_per_epoch of global position t uses the
permutation `index_shuffle(., seed=(seed, e))` of the split; global batch s holds positions
[s*G, (s+1)*G) and process p takes rows [p*L, (p+1)*L) of it. So the batch at step s depends on
(seed, s) only, the processes' batches concatenate to the one-process batch, and `start_step` jumps
there without decoding anything. Each example's crop and flip are seeded by (seed, epoch, example).
"""

import dataclasses
import functools
import itertools
import os
import re

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm

from kdep_jax.data import sequential
from kdep_jax.data import subset as subset_lib
from kdep_jax.data.errors import DataError
from kdep_jax.data.sources import SequentialSource, Source, open_source
from kdep_jax.data.transforms import apply_crop, eval_transform, train_crop, train_transform, without_autograph

# TensorFlow only feeds the host; the accelerators belong to JAX.
tf.config.set_visible_devices([], "GPU")

# "SPLIT:rest": the examples of SPLIT that config.data.subset leaves out (Caltech-256's usual test set).
REST_SUFFIX = ":rest"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_examples: int  # after subset and skipped corrupt files
    num_classes: int
    num_skipped: int = 0  # corrupt or unreadable files left out (skip_corrupt=True)
    random_access: bool = True  # False: TFRecord fallback, batches depend on the process count


@dataclasses.dataclass(frozen=True)
class _Split:
    source: Source | SequentialSource
    indices: np.ndarray | None  # example indices used (None for a sequential source)
    num_skipped: int


def dataset_info(data_config, split: str) -> DatasetInfo:
    s = _open(data_config, split)
    if isinstance(s.source, SequentialSource):
        return DatasetInfo(s.source.num_examples, s.source.num_classes, random_access=False)
    return DatasetInfo(len(s.indices), s.source.num_classes, s.num_skipped)


def train_batches(
    data_config,
    split: str,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index=None,
    process_count=None,
    with_crops: bool = False,
    augment: bool = True,
):
    """Endless {"image": float32 (L, S, S, 3), "label": int32 (L,)} batches from `start_step` on.

    with_crops=True adds each row's augmentation draw, "crop": int32 (L, 5) [top, left, height, width, flip],
    and its example's "index" (L,), which a teacher-target cache records and checks on replay.
    augment=False: the eval transform instead of the random crop and flip (its "crop" is all zeros), for
    methods whose targets were computed once per example without augmentation.
    """
    p, count, local = _layout(global_batch_size, process_index, process_count)
    s = _open(data_config, split)
    size = data_config.image_size
    if isinstance(s.source, SequentialSource):
        if with_crops:
            raise DataError(
                f"A teacher-target cache needs random access, but TFDS {data_config.name!r} is stored as TFRecord. "
                f"Convert it once: tfds convert_format --dataset_version_dir={s.source.builder.data_path} "
                f"--out_file_format=array_record"
            )
        ds = sequential.train_examples(
            s.source,
            lambda im, sd: train_transform(im, sd, size, data_config.min_crop_scale),
            local,
            seed,
            start_step,
            p,
            count,
            data_config.shuffle_buffer,
        )
        return _iterate(ds.batch(local, drop_remainder=True), data_config, s, None)
    n = len(s.indices)
    if n < global_batch_size:
        raise DataError(
            f"{_name(data_config, split)} has {n} examples, fewer than the global batch "
            f"size {global_batch_size}: lower the batch size or use more data."
        )
    per_epoch = n // global_batch_size * global_batch_size  # drop_remainder
    table = tf.constant(s.indices, tf.int64)

    def example(k):  # local element k (from start_step on) -> (example index, epoch)
        t = (start_step + k // local) * global_batch_size + p * local + k % local
        epoch = t // per_epoch
        j = tf.random.experimental.index_shuffle(
            t % per_epoch, tf.stack([tf.cast(seed, tf.int64), epoch]), tf.constant(n - 1, tf.int64)
        )
        return tf.gather(table, j), epoch

    def load(k):
        index, epoch = example(k)
        image, label = s.source.read(index)
        if augment:
            example_seed = tf.random.experimental.stateless_fold_in(tf.stack([tf.cast(seed, tf.int64), epoch]), index)
            crop = train_crop(tf.shape(image), example_seed, data_config.min_crop_scale)
            row = {"image": apply_crop(image, crop, size), "label": label}
        else:
            crop = tf.zeros([5], tf.int32)
            row = {"image": _eval(image, data_config), "label": label}
        if with_crops:
            row.update(crop=crop, index=index)
        return row

    ds = tf.data.Dataset.counter().map(without_autograph(load), num_parallel_calls=tf.data.AUTOTUNE,
                                       deterministic=True)
    batch_examples = lambda b: [int(example(tf.constant(k, tf.int64))[0]) for k in range(b * local, (b + 1) * local)]
    return _iterate(ds.batch(local, drop_remainder=True), data_config, s, batch_examples)


def eval_batches(
    data_config,
    split: str,
    global_batch_size: int,
    process_index=None,
    process_count=None,
    augment_seed=None,
    with_index: bool = False,
):
    """One pass: {"image", "label", "mask" (bool, False on padding)}; every example once over processes.

    Every process yields ceil(N / G) batches (the last padded), so batches can be assembled collectively.
    With `augment_seed`, images get the training augmentation (seeded per example) instead. with_index adds each
    row's example index, "index" int64 (-1 on padding), for per-example tables (needs random access).
    """
    p, count, local = _layout(global_batch_size, process_index, process_count)
    s = _open(data_config, split)
    size = data_config.image_size
    if augment_seed is None:
        transform = lambda image, _: _eval(image, data_config)
    else:
        transform = lambda image, example_seed: train_transform(image, example_seed, size, data_config.min_crop_scale)
    pad = lambda: {"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32), "mask": tf.constant(False),
                   **({"index": tf.constant(-1, tf.int64)} if with_index else {})}
    if isinstance(s.source, SequentialSource):
        if with_index:
            raise DataError(
                f"Per-example teacher outputs need random access, but TFDS {data_config.name!r} is stored as TFRecord. "
                f"Convert it once: tfds convert_format --dataset_version_dir={s.source.builder.data_path} "
                f"--out_file_format=array_record"
            )
        ds = sequential.eval_examples(s.source, transform, pad, local, augment_seed, p, count)
        return _iterate(ds.batch(local), data_config, s, None)
    n = len(s.indices)
    num_batches = -(-n // global_batch_size)
    table = tf.constant(s.indices, tf.int64)
    base_seed = tf.constant([augment_seed or 0, 0], tf.int64)

    def position(k):
        return (k // local) * global_batch_size + p * local + k % local

    def load(k):
        t = position(k)
        index = tf.gather(table, tf.minimum(t, n - 1))

        def real():
            image, label = s.source.read(index)
            example_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
            row = {"image": transform(image, example_seed), "label": label, "mask": tf.constant(True)}
            return {**row, "index": index} if with_index else row

        return tf.cond(t < n, real, pad)

    ds = tf.data.Dataset.range(num_batches * local).map(without_autograph(load), num_parallel_calls=tf.data.AUTOTUNE,
                                                        deterministic=True)
    batch_examples = lambda b: [int(s.indices[t]) for t in map(position, range(b * local, (b + 1) * local)) if t < n]
    return _iterate(ds.batch(local), data_config, s, batch_examples)


def _eval(image, data_config):
    return eval_transform(image, data_config.image_size, data_config.eval_resize_ratio,
                          data_config.eval_interpolation)


def _layout(global_batch_size, process_index, process_count):
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise DataError(
            f"Global batch size {global_batch_size} is not divisible by the process count "
            f"{count}: choose a multiple of {count}."
        )
    if not 0 <= p < count:
        raise ValueError(f"process_index {p} is outside [0, {count}).")
    return p, count, global_batch_size // count


def _iterate(ds, data_config, s, batch_examples):
    """Yields numpy batches; a read or decode error becomes a DataError naming the example."""
    iterator = ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options(data_config)).as_numpy_iterator()
    for b in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise _locate(e, s.source, batch_examples(b) if batch_examples else []) from e
        yield batch


def dataset_options(data_config) -> tf.data.Options:
    """Deterministic order, and tf.data's autotuning off: each parallel map runs on all the pool's threads
    (config.data.threads, or every core) and each AUTOTUNE prefetch buffer grows while it runs empty.

    Deleting an iterator joins autotuning's model thread, and TensorFlow 2.21's sometimes sleeps through the
    cancellation until its optimisation period ends: the end of a stage waited 30-38 s in 7 of 12 demo runs on a
    2-core AMD EPYC (benchmarks/README.md, "The 30-second wait at the end of a stage"). A decode-bound pipeline
    reads as fast without it.
    """
    options = tf.data.Options()
    options.deterministic = True
    if data_config.threads:
        options.threading.private_threadpool_size = data_config.threads
    options.autotune.enabled = False
    options.autotune.initial_parallelism = data_config.threads or os.cpu_count()  # tf.data caps it at the pool's size
    return options


def _op_message(error: tf.errors.OpError) -> str:
    """TensorFlow's message without the "{{function_node ...}}" prefix that names its internal graph node."""
    return re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message).strip()


def _locate(error, source, examples):
    """Finds the example of a failed batch that cannot be read, by reading each one eagerly."""
    for i in examples:
        try:
            source.read(tf.constant(i, tf.int64))
        except tf.errors.OpError as e:
            return DataError(
                f"Cannot read {source.describe(i)}: {_op_message(e)} The file is corrupt, "
                "truncated or not an image: replace or delete it, or set "
                "config.data.skip_corrupt=True to leave unreadable images out."
            )
    return DataError(f"Reading the input failed: {_op_message(error)}")


def _open(data_config, split) -> _Split:
    return _open_cached(ml_collections.FrozenConfigDict(data_config), split)


@functools.lru_cache(maxsize=8)
def _open_cached(cfg, split) -> _Split:
    """Opens a split once per config: listing folders, subsets and corrupt scans can take a while."""
    base_split = split.removesuffix(REST_SUFFIX)
    rest = base_split != split
    source = open_source(cfg, base_split)
    use_subset = cfg.subset is not None and base_split == cfg.split
    if rest and not use_subset:
        raise DataError(
            f"Split {split!r} means the images of {base_split!r} that config.data.subset leaves out, so it needs "
            f"config.data.split={base_split!r} and a config.data.subset (e.g. 60 per class for Caltech-256)."
        )
    if isinstance(source, SequentialSource):
        if use_subset:
            raise DataError(
                f"config.data.subset needs random access, but TFDS {cfg.name!r} is stored as "
                f"TFRecord. Convert it once: tfds convert_format --dataset_version_dir="
                f"{source.builder.data_path} --out_file_format=array_record"
            )
        return _Split(source, None, 0)
    indices = np.arange(source.num_examples)
    if use_subset:
        indices = subset_lib.select(source.num_examples, source.labels, cfg.subset, cfg.subset_seed)
        if rest:
            indices = np.setdiff1d(np.arange(source.num_examples), indices)
    num_skipped = 0
    if cfg.skip_corrupt:
        indices, num_skipped = _drop_unreadable(source, indices, _name(cfg, split), dataset_options(cfg))
    return _Split(source, indices, num_skipped)


def _drop_unreadable(source, indices, name, options):
    """Decodes every example once and keeps those that decode (skip_corrupt=True)."""
    ds = tf.data.Dataset.from_tensor_slices(indices).map(
        without_autograph(lambda i: (i, tf.shape(source.read(i)[0])[0])), num_parallel_calls=tf.data.AUTOTUNE
    ).with_options(options)
    good = [
        i
        for i, _ in tqdm.tqdm(
            ds.ignore_errors().as_numpy_iterator(), total=len(indices), desc=f"checking {name}", unit="img"
        )
    ]
    bad = np.setdiff1d(indices, good)
    if len(bad) == len(indices):
        raise DataError(
            f"None of the {len(indices)} images of {name} can be read (e.g. {source.describe(int(bad[0]))})."
        )
    if len(bad):
        logging.warning(
            "%s: skipped %d unreadable images of %d (skip_corrupt=True), e.g. %s.",
            name,
            len(bad),
            len(indices),
            source.describe(int(bad[0])),
        )
    return np.setdiff1d(indices, bad), len(bad)


def _name(cfg, split):
    return f"{cfg.name} split {split!r}"
