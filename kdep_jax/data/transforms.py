"""Per-image transforms as torchvision does them (RandomResizedCrop + flip; Resize + CenterCrop), in tf, and
the eval transform of teachers trained in TensorFlow (EfficientNet-Lite).

Randomness is stateless: every draw is a function of the seed passed in, so a pipeline can give each
example its own seed and the result does not depend on thread scheduling or on which process reads it.
"""

import math

import tensorflow as tf

from kdep_jax.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params tries this many boxes before its fallback

# tf.data passes every mapped function through AutoGraph, which rewrites Python control flow on tensors into graph
# ops. kdep_jax's are graph ops already (tf.cond where they branch), so the pipelines map them as written: the same
# images, 1.2 s less before a process's first batches (its first training batch 1.64 -> 1.01 s, its first evaluation
# batch 0.71 -> 0.17 s, the tiny demo on the Zen 4 AMD EPYC), and none of the source files AutoGraph writes to the
# temporary directory, which a killed run left there.
without_autograph = tf.autograph.experimental.do_not_convert


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP/GIF bytes -> uint8 (H, W, 3): grayscale, CMYK, alpha and palette images become RGB."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def random_resized_crop_box(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: returns (top, left, crop_height, crop_width), int32.

    Ten candidate boxes with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first that
    fits wins, otherwise the centre crop clamped to `ratio`. Sizes round half to even like Python's round.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    area = h * w * tf.random.stateless_uniform([_ATTEMPTS], seeds[0], scale[0], scale[1], tf.float64)
    log_ratio = tf.random.stateless_uniform([_ATTEMPTS], seeds[1], math.log(ratio[0]), math.log(ratio[1]), tf.float64)
    aspect = tf.exp(log_ratio)
    cand_w = tf.round(tf.sqrt(area * aspect))
    cand_h = tf.round(tf.sqrt(area / aspect))
    fits = (cand_w > 0) & (cand_w <= w) & (cand_h > 0) & (cand_h <= h)
    first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first fitting box (0 if none fits)

    in_ratio = w / h
    fallback_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fallback_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    found = tf.reduce_any(fits)
    crop_h = tf.cast(tf.where(found, cand_h[first], fallback_h), tf.int32)
    crop_w = tf.cast(tf.where(found, cand_w[first], fallback_w), tf.int32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    # torch.randint(0, n + 1) is uniform on 0..n; the fallback is centred with floor division.
    top = tf.where(found, _randint(seeds[2], height - crop_h + 1), (height - crop_h) // 2)
    left = tf.where(found, _randint(seeds[3], width - crop_w + 1), (width - crop_w) // 2)
    return top, left, crop_h, crop_w


def _randint(seed, high):
    return tf.random.stateless_uniform([], seed, 0, tf.maximum(high, 1), tf.int32)


def train_crop(image_shape, seed, min_scale: float = 0.08) -> tf.Tensor:
    """The training augmentation's draw for one image: int32 [top, left, height, width, flip]."""
    top, left, crop_h, crop_w = random_resized_crop_box(image_shape[0], image_shape[1], seed, scale=(min_scale, 1.0))
    flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    flip = tf.cast(tf.random.stateless_uniform([], flip_seed) < 0.5, tf.int32)
    return tf.stack([top, left, crop_h, crop_w, flip])


def apply_crop(image: tf.Tensor, crop: tf.Tensor, size: int) -> tf.Tensor:
    """Crops, resizes to size x size (bilinear, antialiased), flips as `crop` says, then normalises."""
    top, left, crop_h, crop_w, flip = tf.unstack(crop)
    out = tf.image.resize(image[top : top + crop_h, left : left + crop_w], [size, size], method="bilinear",
                          antialias=True)
    out = tf.cond(flip > 0, lambda: tf.image.flip_left_right(out), lambda: out)
    return normalize(out)


def train_transform(image: tf.Tensor, seed, size: int, min_scale: float = 0.08) -> tf.Tensor:
    """RandomResizedCrop(size, scale=(min_scale, 1)) + RandomHorizontalFlip, then ImageNet normalisation."""
    return apply_crop(image, train_crop(tf.shape(image), seed, min_scale), size)


def eval_transform(image: tf.Tensor, size: int, resize_ratio: float = 256 / 224,
                   interpolation: str = "bilinear") -> tf.Tensor:
    """Resize(round(size * resize_ratio), interpolation) + CenterCrop(size), then ImageNet normalisation: float32
    (S, S, 3). torchvision's ImageNet transform by default; its Swin weights' with 232 / 224 and "bicubic".

    As torchvision: the shorter side goes to the target and the longer to int(target * long / short);
    the crop offset is round((side - size) / 2), half to even.
    """
    target = round(size * resize_ratio)
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float64)
    w = tf.cast(shape[1], tf.float64)
    short = tf.minimum(h, w)
    target_t = tf.constant(target, tf.float64)
    new_h = tf.where(h <= w, target_t, tf.floor(target * h / short))
    new_w = tf.where(h <= w, tf.floor(target * w / short), target_t)
    resized = tf.image.resize(image, tf.cast([new_h, new_w], tf.int32), method=interpolation, antialias=True)
    top = tf.cast(tf.round((new_h - size) / 2), tf.int32)
    left = tf.cast(tf.round((new_w - size) / 2), tf.int32)
    crop = tf.ensure_shape(resized[top : top + size, left : left + size], [size, size, 3])
    return normalize(crop)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> ImageNet mean/std normalised float32, as ToTensor + Normalize."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def padded_center_crop_transform(image: tf.Tensor, size: int, crop_padding: int, interpolation: str,
                                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> tf.Tensor:
    """TensorFlow's EfficientNet eval transform: float32 (size, size, 3).

    The centred square of side int(size / (size + crop_padding) * shorter side) (offsets rounded up), resized to
    size x size with tf.image.resize (no antialiasing), then (pixel - mean) / std on 0..255 values. A teacher's
    own transform: `padded_center_crop_transform(image, **dataclasses.asdict(efficientnet.TENSORFLOW_EVAL[arch]))`.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    crop = tf.cast(size / (size + crop_padding) * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    top = (height - crop + 1) // 2
    left = (width - crop + 1) // 2
    resized = tf.image.resize(image[top : top + crop, left : left + crop], [size, size], method=interpolation)
    resized = tf.ensure_shape(resized, [size, size, 3])
    return (resized - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
