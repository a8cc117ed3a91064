"""The built-in demo dataset: layout, determinism, and that it is a real but not trivial learning task."""
import time

import numpy as np
import pytest

from kdep_jax.data import demo

COUNTS = {  # split: (classes, images per class), as documented in kdep_jax/data/demo.py
    "upstream_train": (38, 100),
    "upstream_test": (38, 20),
    "downstream_train": (10, 10),
    "downstream_test": (10, 50),
}


@pytest.mark.parametrize("split", demo.SPLITS)
def test_shapes_dtypes_and_balanced_classes(split):
    classes, per_class = COUNTS[split]
    images, labels = demo.load(split)
    assert images.shape == (classes * per_class, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (classes * per_class,) and labels.dtype == np.int32
    assert demo.num_classes(split) == classes and demo.num_examples(split) == classes * per_class
    np.testing.assert_array_equal(np.bincount(labels, minlength=classes), [per_class] * classes)
    assert len(demo.class_names(split)) == classes
    assert images.min() < 30 and images.max() > 225  # uses the whole range, not a constant image


@pytest.mark.parametrize("size", [48, 64])
def test_renders_at_requested_size(size):
    images, labels = demo.load("downstream_train", image_size=size)
    assert images.shape == (100, size, size, 3)
    np.testing.assert_array_equal(labels, demo.load("downstream_train")[1])  # same scenes, finer pixels


def test_downstream_labels_are_new_combinations_of_upstream_factors():
    upstream, downstream = set(demo.class_names("upstream_train")), set(demo.class_names("downstream_train"))
    assert not upstream & downstream
    for name in downstream:
        shape, texture = name.split("/")
        assert any(n.startswith(shape + "/") for n in upstream)
        assert any(n.endswith("/" + texture) for n in upstream)


def test_unknown_split_names_the_choices():
    with pytest.raises(ValueError, match="upstream_train, upstream_test, downstream_train, downstream_test"):
        demo.load("train")
    with pytest.raises(ValueError, match="upstream_train"):
        demo.num_classes("validation")


def test_deterministic_under_seed_and_read_only():
    images, labels = demo.load("downstream_test", seed=3)
    again, again_labels = demo._generate.__wrapped__("downstream_test", 32, 3)  # regenerated, not cached
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    other, _ = demo.load("downstream_test", seed=4)
    assert not np.any(np.all(images.reshape(len(images), -1) == other.reshape(len(other), -1), axis=1))
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 0


def test_no_image_repeats_across_splits():
    everything = [image.tobytes() for split in demo.SPLITS for image in demo.load(split)[0]]
    assert len(set(everything)) == len(everything)


def test_generation_is_fast():
    start = time.perf_counter()
    for split in demo.SPLITS:
        demo._generate.__wrapped__(split, 32, 11)  # bypasses the cache
    assert time.perf_counter() - start < 10.0  # about 1 s on one CPU core at 32 px


def _nearest_class_mean(train_x, train_y, test_x, test_y):
    means = np.stack([train_x[train_y == c].mean(0) for c in range(train_y.max() + 1)])
    distances = (test_x**2).sum(1, keepdims=True) - 2 * test_x @ means.T + (means**2).sum(1)
    return np.mean(distances.argmin(1) == test_y)


def _raw_pixels(images):
    return images.reshape(len(images), -1).astype(np.float64) / 255


def _log_spectrum(images):
    """Translation-invariant gray-level power spectrum: sees stripe orientation and frequency, object size."""
    gray = images.astype(np.float64).mean(-1)
    gray -= gray.mean((1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.rfft2(gray))).reshape(len(images), -1)


def test_learnable_but_not_from_raw_pixels():
    train_x, train_y = demo.load("upstream_train")
    test_x, test_y = demo.load("upstream_test")
    chance = 1 / demo.num_classes("upstream_train")
    # Nuisance variation (position, colour, polarity) defeats a template on raw pixels ...
    raw = _nearest_class_mean(_raw_pixels(train_x), train_y, _raw_pixels(test_x), test_y)
    assert raw < 3 * chance
    # ... while a translation-invariant feature finds the classes: the labels carry real signal.
    spectral = _nearest_class_mean(_log_spectrum(train_x), train_y, _log_spectrum(test_x), test_y)
    assert spectral > 8 * chance
    assert spectral < 0.9  # and a hand-made feature does not solve it outright
