"""Real images that install with pip and need no download: scikit-image's bundled photos and its LFW subset.

They let a real pre-trained teacher be distilled and transferred offline (configs/demo.py:real):

- "photo_patches" (unlabeled): square crops of the natural photos inside the scikit-image wheel (a cat, a cup of
  coffee, an astronaut, a rocket, a motorcycle, the moon, coins, textures, microscopy, ...), 4096 in "train" and
  256 in "test" (other crops of the same photos). Each crop is a box drawn once from (demo_seed, split): a random
  photo region of 15-60% of its shorter side, so that it shows an object or a part of one, as an ImageNet
  photo would. The pipeline then crops and flips each of them again for training.
- "lfw_subset" (labelled): scikit-image's 200 grey 25 x 25 crops of Labeled Faces in the Wild, class 0 "face"
  (100) and class 1 "not_face" (100, background regions of the same photos). One split, "train"; the demo trains
  on `config.data.subset` images per class and tests on the rest ("train:rest").

Grey images are given as RGB (the three channels equal). Only the files that ship in the wheel are used (the
loaders of the others download them, which nothing here may do); the synthetic images (checkerboards, phantoms,
logos, colour wheels) and the line drawing `horse` are left out.
"""
import functools

import numpy as np

from kdep_jax.data.errors import DataError

# scikit-image's bundled natural photos (skimage.data.<name>()), colour first.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "motorcycle", "camera", "brick", "grass", "gravel", "coins", "moon", "clock", "cell", "page", "text")
PATCH_SPLITS = {"train": 4096, "test": 256}
PATCH_SIDE = (0.15, 0.6)  # a crop's side, as a fraction of its photo's shorter side
LFW_SPLITS = ("train",)
LFW_CLASSES = ("face", "not_face")
_INSTALL = "pip install scikit-image"


def _skimage_data(dataset: str):
    try:
        from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise DataError(f"config.data.name={dataset!r} reads the images that ship with scikit-image, which is not "
                        f"installed ({error}): {_INSTALL}.") from None
    return skimage_data


def _uint8(images: np.ndarray) -> np.ndarray:
    """scikit-image gives some images as floats in [0, 1]."""
    return images if images.dtype == np.uint8 else np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _photo(skimage_data, name: str) -> np.ndarray:
    """uint8 (H, W, 3); grey photos get three equal channels."""
    image = _uint8(np.asarray(skimage_data.stereo_motorcycle()[0] if name == "motorcycle"
                              else getattr(skimage_data, name)()))
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


@functools.cache
def photos() -> tuple[np.ndarray, ...]:
    """The photos of PHOTOS, uint8 (H, W, 3) each, read-only."""
    skimage_data = _skimage_data("photo_patches")
    images = tuple(_photo(skimage_data, name) for name in PHOTOS)
    for image in images:
        image.flags.writeable = False
    return images


def check_split(dataset: str, split: str, splits) -> None:
    if split not in splits:
        raise DataError(f"{dataset} has no split {split!r}; set config.data.split / eval_split to one of "
                        f"{', '.join(splits)}" + (" (or 'train:rest' for the images config.data.subset leaves out)."
                                                  if dataset == "lfw_subset" else "."))


@functools.cache
def patch_boxes(split: str, seed: int = 0) -> np.ndarray:
    """int64 (N, 5) rows [photo, top, left, height, width]: the crops of `split`, the photos taken in turn.

    A function of (split, seed) and the photos' sizes alone; every split has its own random stream.
    """
    check_split("photo_patches", split, PATCH_SPLITS)
    shapes = np.array([photo.shape[:2] for photo in photos()])
    rng = np.random.default_rng([seed, list(PATCH_SPLITS).index(split), 0x70686F74])
    count = PATCH_SPLITS[split]
    photo = np.arange(count) % len(shapes)
    height, width = shapes[photo, 0], shapes[photo, 1]
    side = np.round(rng.uniform(*PATCH_SIDE, count) * np.minimum(height, width)).astype(np.int64)
    top = rng.integers(0, height - side + 1)
    left = rng.integers(0, width - side + 1)
    boxes = np.stack([photo, top, left, side, side], axis=1).astype(np.int64)
    boxes.flags.writeable = False
    return boxes


@functools.cache
def lfw_subset() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (200, 25, 25, 3), int32 labels: 0 face, 1 not_face), read-only."""
    grey = _uint8(np.asarray(_skimage_data("lfw_subset").lfw_subset()))
    images = np.repeat(grey[..., None], 3, axis=-1)
    labels = np.repeat(np.arange(len(LFW_CLASSES), dtype=np.int32), len(images) // len(LFW_CLASSES))
    images.flags.writeable = labels.flags.writeable = False
    return images, labels
