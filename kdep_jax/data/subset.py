"""KDEP-style subsets (e.g. 10% of ImageNet): a seeded, stable choice of examples, made before sharding."""

from typing import Callable

from absl import logging
import numpy as np

from kdep_jax.data.errors import DataError


def select(num_examples: int, labels: Callable[[], np.ndarray], subset, seed: int) -> np.ndarray:
    """Sorted example indices: all (subset None), a uniform fraction (below 1), or `subset` per class (a whole
    number, 1 or more: config.data.subset is a float field, so that the command line can set it).

    The choice depends only on (num_examples, labels, subset, seed), so every process and every run with
    the same seed trains on the same images.
    """
    if subset is None:
        return np.arange(num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    if 0.0 < subset < 1.0:
        return np.sort(order[: max(1, round(subset * num_examples))])
    if subset >= 1 and float(subset).is_integer():
        subset = int(subset)
        shuffled = labels()[order]
        # Stable sort by label keeps the random order within each class; rank = position inside its class.
        by_class = np.argsort(shuffled, kind="stable")
        sorted_labels = shuffled[by_class]
        class_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = np.arange(num_examples) - class_start
        counts = np.bincount(sorted_labels)
        short = np.flatnonzero((counts > 0) & (counts < subset))
        if short.size:
            logging.warning(
                "subset=%d images per class: %d classes have fewer, taking all of theirs (e.g. class %d has %d).",
                subset,
                short.size,
                short[0],
                counts[short[0]],
            )
        return np.sort(order[by_class[rank < subset]])
    raise DataError(
        f"config.data.subset={subset!r}: use None (all), a fraction below 1 (e.g. 0.1), "
        "or a whole number of images per class (e.g. 128)."
    )
