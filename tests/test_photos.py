"""scikit-image's real images as data sources: crops of its photos (unlabeled) and its LFW faces (labelled), read
through the input pipeline and checked against the images scikit-image itself returns."""
import sys

import numpy as np
import pytest
import tensorflow as tf
from skimage import data as skimage_data

from kdep_jax import config_lib, data
from kdep_jax.data import photos, sources


def data_config(name, split, eval_split, **fields):
    config = config_lib.data_config()
    config.update(name=name, split=split, eval_split=eval_split, image_size=32, **fields)
    return config


def test_photo_patches_are_crops_of_scikit_image_photos():
    """Example i is, pixel for pixel, its box of the photo scikit-image returns (grey ones on three channels)."""
    config = data_config("photo_patches", "train", "test")
    assert data.dataset_info(config, "train") == data.DatasetInfo(4096, 0)
    assert data.dataset_info(config, "test") == data.DatasetInfo(256, 0)
    source = sources.open_source(config, "test")
    boxes = photos.patch_boxes("test")
    for i in range(len(photos.PHOTOS) + 1):  # every photo, in turn
        photo, top, left, height, width = boxes[i]
        assert photo == i % len(photos.PHOTOS)
        name = photos.PHOTOS[photo]
        image = skimage_data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage_data, name)()
        crop = image[top:top + height, left:left + width]
        crop = crop[..., :3] if crop.ndim == 3 else np.repeat(crop[..., None], 3, axis=-1)
        patch, label = source.read(tf.constant(i, tf.int64))
        np.testing.assert_array_equal(patch.numpy(), crop)
        assert label.numpy() == 0
    batch = next(data.eval_batches(config, "test", 8, 0, 1))
    assert batch["image"].shape == (8, 32, 32, 3) and np.all(batch["label"] == 0) and batch["mask"].all()


def test_patch_boxes_lie_in_their_photos_and_depend_on_split_and_seed():
    shapes = np.array([photo.shape[:2] for photo in photos.photos()])
    for split, count in photos.PATCH_SPLITS.items():
        boxes = photos.patch_boxes(split)
        photo, top, left, height, width = boxes.T
        shorter = shapes[photo].min(1)
        assert len(boxes) == count and np.all(height == width)
        assert np.all(top >= 0) and np.all(left >= 0)
        assert np.all(top + height <= shapes[photo, 0]) and np.all(left + width <= shapes[photo, 1])
        assert np.all(height >= np.floor(photos.PATCH_SIDE[0] * shorter))
        assert np.all(height <= np.ceil(photos.PATCH_SIDE[1] * shorter))
        used = np.bincount(photo, minlength=len(photos.PHOTOS))
        assert used.max() - used.min() <= 1  # every photo, in turn
    train, test = photos.patch_boxes("train"), photos.patch_boxes("test")
    assert not np.array_equal(train[: len(test)], test)
    assert not np.array_equal(photos.patch_boxes("train", seed=1), train)
    np.testing.assert_array_equal(photos.patch_boxes("train", seed=0), train)


def test_photo_patch_batches_are_a_function_of_seed_and_step():
    config = data_config("photo_patches", "train", "test", min_crop_scale=0.25)
    first = next(data.train_batches(config, "train", 8, seed=0, start_step=3))
    again = next(data.train_batches(config, "train", 8, seed=0, start_step=3))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].shape == (8, 32, 32, 3) and first["image"].std(0).mean() > 0.1


def test_lfw_subset_is_scikit_image_faces_then_non_faces():
    config = data_config("lfw_subset", "train", "train:rest", subset=20)
    assert data.dataset_info(config, "train") == data.DatasetInfo(40, 2)
    assert data.dataset_info(config, "train:rest") == data.DatasetInfo(160, 2)
    expected = skimage_data.lfw_subset()
    expected = expected * 255 if expected.dtype != np.uint8 else expected
    images, labels = photos.lfw_subset()
    np.testing.assert_array_equal(labels, np.repeat([0, 1], 100))
    np.testing.assert_allclose(images[..., 1], expected, atol=0.5)
    batch = next(data.eval_batches(config, "train:rest", 160, 0, 1))
    assert np.bincount(batch["label"]).tolist() == [80, 80]


def test_unknown_splits_and_a_missing_scikit_image_are_named(monkeypatch):
    with pytest.raises(data.DataError, match="photo_patches has no split 'val'.*one of train, test"):
        data.dataset_info(data_config("photo_patches", "val", "test"), "val")
    with pytest.raises(data.DataError, match="lfw_subset has no split 'test'.*one of train .*'train:rest'"):
        data.dataset_info(data_config("lfw_subset", "test", "test"), "test")
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(data.DataError, match="config.data.name='lfw_subset' reads the images that ship with "
                                             "scikit-image, which is not installed .*: pip install scikit-image"):
        photos.lfw_subset.__wrapped__()
