"""Fallback for TFDS datasets stored as TFRecord, which can only be read in file order.

Each process reads its own `tfds.even_splits` shard with a seeded shuffle. Batches are deterministic
for a given (seed, process count), but, unlike the random-access path, the global batch at a step
changes with the process count, and resuming re-reads (without decoding) the skipped records.
Subsets need random access and are refused for such datasets.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from kdep_jax.data.sources import SequentialSource
from kdep_jax.data.transforms import decode, without_autograph


def train_examples(
    src: SequentialSource, transform, local_batch, seed, start_step, process_index, process_count, shuffle_buffer
) -> tf.data.Dataset:
    """Endless shuffled examples of this process's shard, positioned at `start_step`.

    transform(image, example_seed) -> float image; the seed of the k-th example read is (seed, process, k).
    """
    shard = tfds.even_splits(src.split, n=process_count, drop_remainder=False)[process_index]
    ds = _read(src, shard, shuffle_files=True, seed=seed)
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed)
    ds = ds.enumerate().skip(start_step * local_batch)  # skipped records are not decoded
    return _transformed(ds, src, transform, seed, process_index)


def eval_examples(
    src: SequentialSource, transform, pad, local_batch, seed, process_index, process_count
) -> tf.data.Dataset:
    """This process's shard once, then pad() examples so that every process has the same batch count."""
    shards = tfds.even_splits(src.split, n=process_count, drop_remainder=False)
    sizes = [src.builder.info.splits[s].num_examples for s in shards]
    num_batches = -(-max(sizes) // local_batch)
    ds = _read(src, shards[process_index], shuffle_files=False, seed=None).enumerate()
    ds = _transformed(ds, src, transform, seed, process_index)
    ds = ds.map(without_autograph(lambda ex: {**ex, "mask": tf.constant(True)}))
    padding = tf.data.Dataset.range(num_batches * local_batch - sizes[process_index])
    return ds.concatenate(padding.map(without_autograph(lambda _: pad())))


def _read(src, shard, shuffle_files, seed):
    return src.builder.as_dataset(
        split=shard,
        shuffle_files=shuffle_files,
        decoders={src.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )


def _transformed(ds, src, transform, seed, process_index):
    base = tf.constant([seed or 0, process_index], tf.int64)

    def example(k, ex):
        return {"image": transform(decode(ex[src.image_key]), tf.random.experimental.stateless_fold_in(base, k)),
                "label": tf.cast(ex[src.label_key], tf.int32)}

    return ds.map(without_autograph(example), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
