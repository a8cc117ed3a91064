"""Input pipeline throughput: decoded + augmented training images/s at 224 px, from a folder of JPEGs.

Writes N JPEGs (smooth colour fields with edges and noise, about natural-image compressibility) into
<dir>/train/<class>/, runs `kdep_jax.data.train_batches` on them with a private tf.data pool of
--threads threads, and reports images/s in total and per thread (core) after a warm-up.

  python benchmarks/input_pipeline.py --num_images 500 --threads 2 --json out.json
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from kdep_jax import config_lib, data


def write_images(root, num_images, width, height, num_classes=10, seed=0):
    """JPEGs with low-frequency colour, a few hard-edged blobs and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(num_images):
        image = np.zeros((height, width, 3))
        for _ in range(4):
            phase = 2 * np.pi * (rng.uniform(0, 3) * x + rng.uniform(0, 3) * y + rng.uniform())
            image += np.sin(phase)[..., None] * rng.uniform(-40, 40, 3)
        for _ in range(5):
            cy, cx, r = rng.uniform(0, 1, 3) * [height / width, 1, 0.3]
            image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] += rng.uniform(-60, 60, 3)
        image = np.clip(128 + image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        path = os.path.join(root, "train", f"class_{i % num_classes}", f"{i:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path, quality=90)


def measure(root, image_size, batch_size, threads, warmup_steps, steps):
    cfg = config_lib.data_config()
    cfg.name, cfg.data_dir, cfg.split, cfg.image_size, cfg.threads = (
        "image_folder",
        root,
        "train",
        image_size,
        threads,
    )
    batches = data.train_batches(cfg, "train", batch_size, seed=0, process_index=0, process_count=1)
    for _ in range(warmup_steps):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=350)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", help="folder to write the JPEGs to (default: a temporary one)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        write_images(root, args.num_images, args.width, args.height)
        rate = measure(root, args.image_size, args.batch_size, args.threads, args.warmup_steps, args.steps)
    result = {
        "images_per_s": rate,
        "images_per_s_per_core": rate / args.threads,
        "threads": args.threads,
        "image_size": args.image_size,
        "source_px": [args.width, args.height],
        "batch_size": args.batch_size,
        "steps": args.steps,
    }
    print(
        f"input pipeline: {rate:.0f} images/s total, {rate / args.threads:.0f} images/s per core "
        f"({args.threads} threads, {args.width}x{args.height} JPEG -> {args.image_size} px "
        "RandomResizedCrop + flip + normalise)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
