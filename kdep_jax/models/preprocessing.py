"""How a family's pre-trained weights expect their images: the eval transform and the normalisation.

The input pipeline normalises with ImageNet's mean and std, as torchvision's weights expect. A teacher trained
on other inputs (EfficientNet-Lite's TensorFlow weights: (x - 127) / 128) gets its own normalisation from the
batch by an affine map (`to_own_normalisation`), and a pass of the teacher without augmentation (TCS's
coordinates) uses its own eval resize and interpolation (torchvision's Swin: 232 px bicubic, then 224).
"""
import dataclasses

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on 0..1 values, as torchvision's Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """resize_ratio: the eval transform resizes the shorter side to round(ratio * crop size) before the centre
    crop; interpolation: "bilinear" or "bicubic"; mean, std: the normalisation, on 0..255 values."""
    resize_ratio: float = 256 / 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = tuple(255 * m for m in IMAGENET_MEAN)
    std: tuple[float, float, float] = tuple(255 * s for s in IMAGENET_STD)


IMAGENET = Preprocessing()


def to_own_normalisation(images, preprocessing: Preprocessing):
    """ImageNet-normalised images (what the pipeline makes) -> the same images in `preprocessing`'s normalisation."""
    if (preprocessing.mean, preprocessing.std) == (IMAGENET.mean, IMAGENET.std):
        return images
    pixels = images * jnp.asarray(IMAGENET.std, images.dtype) + jnp.asarray(IMAGENET.mean, images.dtype)
    return (pixels - jnp.asarray(preprocessing.mean, images.dtype)) / jnp.asarray(preprocessing.std, images.dtype)
