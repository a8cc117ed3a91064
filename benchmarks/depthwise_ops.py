"""MobileNetV2's depthwise convolutions on CPU, each alone: kdep_jax against PyTorch channels_last.

The depthwise convs are where the MobileNetV2 distillation step loses most to PyTorch (benchmarks/README.md).
This times each distinct one of the 17 in torchvision's MobileNetV2 at 224 px, batch 32, float32: forward,
input gradient and weight gradient. kdep_jax's side is `kdep_jax.models.layers.depthwise_conv` as the model
runs it on CPU (a sum of shifted products, the XLA flags of `python -m kdep_jax.main`); PyTorch's is
`conv2d(groups=channels)` in channels_last, the gradients from `aten.convolution_backward`. Each framework
runs in its own child process; median milliseconds over timed repetitions after one warm-up.

    python benchmarks/depthwise_ops.py
"""
from __future__ import annotations

import os
import sys

import numpy as np

from resnet18_ops import measure_both, median_ms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BATCH = 32
# (input size, channels, stride, how many of the 17 have this shape), in the order the network runs them.
DEPTHWISE = [(112, 32, 1, 1), (112, 96, 2, 1), (56, 144, 1, 1), (56, 144, 2, 1), (28, 192, 1, 2), (28, 192, 2, 1),
             (14, 384, 1, 4), (14, 576, 1, 2), (14, 576, 2, 1), (7, 960, 1, 3)]


def name(size: int, channels: int, stride: int, count: int, kind: str) -> str:
    return f"depthwise 3x3/{stride} {size}px {channels}ch (x{count}), {kind}"


def kdep_jax_ops(repeats: int) -> dict[str, float]:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax

    from kdep_jax.models.layers import depthwise_conv

    rng = np.random.default_rng(0)
    results = {}
    for size, channels, stride, count in DEPTHWISE:
        x = jax.numpy.asarray(rng.normal(size=(BATCH, size, size, channels)).astype(np.float32))
        kernel = jax.numpy.asarray(rng.normal(size=(3, 3, 1, channels)).astype(np.float32))
        grad = jax.numpy.asarray(rng.normal(size=(BATCH, size // stride, size // stride, channels)).astype(np.float32))

        def conv(x, kernel):
            return depthwise_conv(x, kernel, stride, shifted_sum=True)

        fns = {"forward": (conv, (x, kernel)),
               "input gradient": (lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0], (x, kernel, grad)),
               "weight gradient": (lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0], (x, kernel, grad))}
        for kind, (fn, args) in fns.items():
            compiled = jax.jit(fn)
            results[name(size, channels, stride, count, kind)] = median_ms(
                lambda: jax.block_until_ready(compiled(*args)), repeats)
    return results


def pytorch_ops(repeats: int) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    results = {}
    for size, channels, stride, count in DEPTHWISE:
        x = torch.randn(BATCH, channels, size, size).to(memory_format=torch.channels_last)
        weight = torch.randn(channels, 1, 3, 3)
        grad = torch.randn(BATCH, channels, size // stride, size // stride).to(memory_format=torch.channels_last)

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, [stride, stride], [1, 1], [1, 1],
                                                               False, [0, 0], channels, mask)

        with torch.no_grad():
            results[name(size, channels, stride, count, "forward")] = median_ms(
                lambda: torch.nn.functional.conv2d(x, weight, stride=stride, padding=1, groups=channels), repeats)
            results[name(size, channels, stride, count, "input gradient")] = median_ms(
                backward([True, False, False]), repeats)
            results[name(size, channels, stride, count, "weight gradient")] = median_ms(
                backward([False, True, False]), repeats)
    return results


def print_rows(ours: dict[str, float], theirs: dict[str, float]) -> None:
    for op, ms in ours.items():
        print(f"| {op} | {ms} | {theirs[op]} | {ms / theirs[op]:.2f}x |")
    totals = [sum(ms * count_of(op) for op, ms in side.items()) for side in (ours, theirs)]
    print(f"| all 17, forward and both gradients | {totals[0]:.0f} | {totals[1]:.0f} | {totals[0] / totals[1]:.2f}x |")


def count_of(op: str) -> int:
    """How many of the 17 depthwise convs an op's row stands for (its "(xN)")."""
    return int(op.split("(x")[1].split(")")[0])


if __name__ == "__main__":
    measure_both(__doc__, __file__, kdep_jax_ops, pytorch_ops, f"MobileNetV2 depthwise convs, batch {BATCH}",
                 print_rows)
