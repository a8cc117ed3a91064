"""Built-in demo data: a procedurally generated image classification task, no download.

It exists to show the effect KDEP is about: pre-training on a large upstream task helps a data-poor
downstream task. Every image holds one object with a *shape* (8 kinds) filled with a *texture* (6 kinds),
under nuisance variation that a classifier has to become invariant to: position, scale, rotation, colours,
contrast polarity, a smooth coloured background and pixel noise.

- Upstream (``upstream_*``): 38 classes, one per (shape, texture) pair, 100 train / 20 test images each.
- Downstream (``downstream_*``): 10 *other* (shape, texture) pairs, held out of the upstream label set,
  10 train / 50 test images each. Each downstream class shares its shape with some upstream classes and
  its texture with others, so features that recognise shapes and textures (which the upstream task forces
  a network to learn) transfer, while 100 images are too few to learn them from scratch.

Images are drawn in normalised coordinates and rendered at the requested size (not resized), so 32, 48
or 64 px show the same scenes. Every split has its own random stream derived from ``seed``, so no image
repeats across splits and a different seed changes every image.
"""
import functools
import itertools

import numpy as np

SPLITS = ("upstream_train", "upstream_test", "downstream_train", "downstream_test")
SHAPES = ("disc", "ring", "square", "triangle", "cross", "star", "crescent", "bar")
TEXTURES = ("solid", "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checker", "dots")

# Held out of upstream; every shape and every texture occurs, and several shapes and textures occur
# twice, so a downstream class is identified only by recognising both factors.
_DOWNSTREAM_PAIRS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (6, 1), (7, 2), (0, 4), (3, 0))
_UPSTREAM_PAIRS = tuple(
    p for p in itertools.product(range(len(SHAPES)), range(len(TEXTURES))) if p not in _DOWNSTREAM_PAIRS)
_PER_CLASS = {"upstream_train": 100, "upstream_test": 20, "downstream_train": 10, "downstream_test": 50}
_CHUNK = 512  # images rendered at once; bounds the temporaries (about 30 MB each at 64 px).


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"Unknown demo split {split!r}: choose one of {', '.join(SPLITS)} "
                         "(config.data.split).")


def _pairs(split):
    _check_split(split)
    return _UPSTREAM_PAIRS if split.startswith("upstream") else _DOWNSTREAM_PAIRS


def num_classes(split):
    """Number of classes of `split` (38 upstream, 10 downstream)."""
    return len(_pairs(split))


def num_examples(split):
    """Number of images of `split`: classes x images per class."""
    return num_classes(split) * _PER_CLASS[split]


def class_names(split):
    """Class names of `split` in label order, e.g. 'star/dots'."""
    return [f"{SHAPES[s]}/{TEXTURES[t]}" for s, t in _pairs(split)]


def load(split, image_size=32, seed=0):
    """Returns (images uint8 (N, size, size, 3), labels int32 (N,)), classes balanced, order shuffled.

    Results are cached in-process and returned read-only, so a caller cannot corrupt the cache.
    """
    _check_split(split)
    if int(image_size) < 8:
        raise ValueError(f"Demo image_size must be at least 8 pixels, got {image_size}.")
    return _generate(split, int(image_size), int(seed))


@functools.lru_cache(maxsize=16)
def _generate(split, image_size, seed):
    # A separate stream per (seed, split): splits never share images, any seed change changes all of them.
    rng = np.random.default_rng([seed, SPLITS.index(split), 0x6B646570])
    pairs = np.array(_pairs(split))
    labels = rng.permutation(np.repeat(np.arange(len(pairs)), _PER_CLASS[split])).astype(np.int32)
    images = np.concatenate([
        _render(pairs[labels[i:i + _CHUNK]], image_size, rng) for i in range(0, len(labels), _CHUNK)])
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _render(pairs, size, rng):
    """Draws one image per (shape, texture) row of `pairs`."""
    n = len(pairs)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    y, x = grid[None, :, None], grid[None, None, :]

    # Object pose: the nuisance variation a classifier must become invariant to.
    cx, cy = rng.uniform(-0.35, 0.35, (2, n, 1, 1)).astype(np.float32)
    radius = rng.uniform(0.38, 0.62, (n, 1, 1)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    u = ((x - cx) * cos + (y - cy) * sin) / radius
    v = (-(x - cx) * sin + (y - cy) * cos) / radius
    mask = _shape_masks(pairs[:, 0], u, v)

    # Textures live in image coordinates (so stripe orientation means something) with a random phase.
    period = 0.3
    phase = rng.uniform(0, period, (2, n, 1, 1)).astype(np.float32)
    pattern = _texture_patterns(pairs[:, 1], x + phase[0], y + phase[1], period, rng)

    # Colours: random hues, contrast polarity random (light object on dark ground or the reverse).
    light = rng.random((n, 1, 1)) < 0.5

    def colours(low, high, count):
        level = rng.uniform(low, high, (n, count, 1))
        hue = rng.uniform(0.2, 1.0, (n, count, 3))
        c = np.clip(hue * (level / hue.mean(-1, keepdims=True)), 0, 1).astype(np.float32)
        return np.where(light, c, 1 - c)

    # The texture's two colours are far apart and the background sits between them: with low texture
    # contrast a ResNet's stride-4 stem at 32 px barely learns the textures in a CPU-sized budget.
    ink = colours(0.85, 1.0, 1)[:, None]
    paper = colours(0.0, 0.15, 1)[:, None]
    corners = colours(0.35, 0.55, 9).reshape(n, 3, 3, 3)  # smooth background: bilinear 3x3 colour field
    weights = np.clip(1 - np.abs(grid[:, None] - np.array([-1, 0, 1], np.float32)), 0, 1)
    background = np.einsum("hi,nijc,wj->nhwc", weights, corners, weights, optimize=True)

    fill = np.where(pattern[..., None], ink, paper)
    image = np.where(mask[..., None], fill, background)
    image += 0.04 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def _shape_masks(shapes, u, v):
    """Boolean (n, H, W) silhouettes in object coordinates (u, v); the object spans about [-1, 1]."""
    mask = np.zeros(u.shape, bool)
    for k in range(len(SHAPES)):
        chosen = shapes == k
        if chosen.any():
            mask[chosen] = _shape(k, u[chosen], v[chosen])
    return mask


def _shape(kind, u, v):
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if kind == 0:  # disc
        return rho < 0.9
    if kind == 1:  # ring
        return (rho < 1.0) & (rho > 0.5)
    if kind == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) < 0.75
    if kind == 3:  # triangle, circumradius 1.1
        return rho * np.cos(np.mod(phi, 2 * np.pi / 3) - np.pi / 3) < 0.55
    if kind == 4:  # cross
        return ((np.abs(u) < 0.3) | (np.abs(v) < 0.3)) & (np.maximum(np.abs(u), np.abs(v)) < 1.0)
    if kind == 5:  # five-pointed star
        return rho < 0.4 + 0.7 * ((1 + np.cos(5 * phi)) / 2) ** 2
    if kind == 6:  # crescent
        return (rho < 1.0) & (np.hypot(u - 0.5, v) > 0.75)
    return (np.abs(u) < 1.05) & (np.abs(v) < 0.38)  # bar


def _texture_patterns(textures, x, y, period, rng):
    """Boolean (n, H, W) fill patterns: True where the object takes its 'ink' colour, False 'paper'."""
    pattern = np.zeros(np.broadcast_shapes(x.shape, y.shape), bool)
    for k in range(len(TEXTURES)):
        chosen = textures == k
        if chosen.any():
            pattern[chosen] = _texture(k, x[chosen], y[chosen], period, rng)
    return pattern


def _texture(kind, x, y, period, rng):
    half = period / 2
    if kind == 0:  # solid
        return np.ones(np.broadcast_shapes(x.shape, y.shape), bool)
    if kind == 1:  # horizontal stripes
        return np.broadcast_to(np.mod(y, period) < half, np.broadcast_shapes(x.shape, y.shape))
    if kind == 2:  # vertical stripes
        return np.broadcast_to(np.mod(x, period) < half, np.broadcast_shapes(x.shape, y.shape))
    if kind == 3:  # diagonal stripes, '/' or '\\' at random
        sign = np.where(rng.random((len(x), 1, 1)) < 0.5, 1.0, -1.0).astype(np.float32)
        return np.mod((x + sign * y) / np.sqrt(2), period) < half
    if kind == 4:  # checker
        return (np.mod(x, period) < half) ^ (np.mod(y, period) < half)
    dx, dy = np.mod(x, period) - half, np.mod(y, period) - half  # dots: paper-coloured dots on ink
    return dx * dx + dy * dy > (0.32 * period) ** 2
