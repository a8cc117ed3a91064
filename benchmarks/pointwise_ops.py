"""The 1x1 convolutions' weight gradients on CPU, each alone: XLA's, kdep_jax's dot, PyTorch channels_last's.

XLA's weight gradient of a 1x1 conv is a convolution with an H x W window, which XLA:CPU runs through Eigen after
transposing both operands; `kdep_jax.models.layers.pointwise_conv` (on x86 CPUs with AVX2 and FMA, by default) takes it
as one dot product over the (N * H * W, C) input and output gradient instead. This times both, and PyTorch's
`aten.convolution_backward` in channels_last, for each distinct 1x1 conv of torchvision's MobileNetV2 (34 in all) and
ResNet-18's three stride-2 downsampling convs, at 224 px, batch 32, float32, with the XLA flags of `python -m
kdep_jax.main`. Each framework runs in its own child process; median milliseconds over timed repetitions after one
warm-up.

    python benchmarks/pointwise_ops.py
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

from resnet18_ops import measure_both, median_ms, print_rows

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BATCH = 32
# (input size, input channels, output channels, stride, how many the network has), in the order it runs them.
POINTWISE = [("MobileNetV2", 112, 32, 16, 1, 1), ("MobileNetV2", 112, 16, 96, 1, 1), ("MobileNetV2", 56, 96, 24, 1, 1),
             ("MobileNetV2", 56, 24, 144, 1, 2), ("MobileNetV2", 56, 144, 24, 1, 1), ("MobileNetV2", 28, 144, 32, 1, 1),
             ("MobileNetV2", 28, 32, 192, 1, 3), ("MobileNetV2", 28, 192, 32, 1, 2), ("MobileNetV2", 14, 192, 64, 1, 1),
             ("MobileNetV2", 14, 64, 384, 1, 4), ("MobileNetV2", 14, 384, 64, 1, 3), ("MobileNetV2", 14, 384, 96, 1, 1),
             ("MobileNetV2", 14, 96, 576, 1, 3), ("MobileNetV2", 14, 576, 96, 1, 2), ("MobileNetV2", 7, 576, 160, 1, 1),
             ("MobileNetV2", 7, 160, 960, 1, 3), ("MobileNetV2", 7, 960, 160, 1, 2), ("MobileNetV2", 7, 960, 320, 1, 1),
             ("MobileNetV2", 7, 320, 1280, 1, 1),
             ("ResNet-18", 56, 64, 128, 2, 1), ("ResNet-18", 28, 128, 256, 2, 1), ("ResNet-18", 14, 256, 512, 2, 1)]


def name(net: str, size: int, in_channels: int, out_channels: int, stride: int, count: int) -> str:
    return f"{net} 1x1/{stride} {size}px {in_channels} -> {out_channels} (x{count}), weight gradient"


def kdep_jax_ops(repeats: int) -> dict[str, float]:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax

    from kdep_jax.models.layers import pointwise_conv

    def xla_conv(x, kernel, stride):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def dot_conv(x, kernel, stride):
        return pointwise_conv(x, kernel, stride, True)

    def weight_gradient(conv, stride, x, kernel, grad):
        return jax.vjp(lambda kernel: conv(x, kernel, stride), kernel)[1](grad)[0]

    rng = np.random.default_rng(0)
    results = {}
    for net, size, in_channels, out_channels, stride, count in POINTWISE:
        out_size = (size - 1) // stride + 1
        x = jax.numpy.asarray(rng.normal(size=(BATCH, size, size, in_channels)).astype(np.float32))
        kernel = jax.numpy.asarray(rng.normal(size=(1, 1, in_channels, out_channels)).astype(np.float32))
        grad = jax.numpy.asarray(rng.normal(size=(BATCH, out_size, out_size, out_channels)).astype(np.float32))
        for variant, conv in (("XLA's convolution", xla_conv), ("kdep_jax: dot", dot_conv)):
            compiled = jax.jit(functools.partial(weight_gradient, conv, stride))
            results[f"{name(net, size, in_channels, out_channels, stride, count)} [{variant}]"] = median_ms(
                lambda: jax.block_until_ready(compiled(x, kernel, grad)), repeats)
    return results


def pytorch_ops(repeats: int) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    results = {}
    for net, size, in_channels, out_channels, stride, count in POINTWISE:
        out_size = (size - 1) // stride + 1
        x = torch.randn(BATCH, in_channels, size, size).to(memory_format=torch.channels_last)
        weight = torch.randn(out_channels, in_channels, 1, 1).to(memory_format=torch.channels_last)
        grad = torch.randn(BATCH, out_channels, out_size, out_size).to(memory_format=torch.channels_last)
        with torch.no_grad():
            results[name(net, size, in_channels, out_channels, stride, count)] = median_ms(
                lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, [stride, stride], [0, 0], [1, 1],
                                                            False, [0, 0], 1, [False, True, False]), repeats)
    return results


def print_totals(ours: dict[str, float], theirs: dict[str, float]) -> None:
    print_rows(ours, theirs)
    for net in ("MobileNetV2", "ResNet-18"):
        for variant in ("XLA's convolution", "kdep_jax: dot"):
            total = sum(ms * count_of(op) for op, ms in ours.items() if op.startswith(net) and variant in op)
            print(f"| {net}, all of them [{variant}] | {total:.0f} | "
                  f"{sum(ms * count_of(op) for op, ms in theirs.items() if op.startswith(net)):.0f} | |")


def count_of(op: str) -> int:
    """How many of the network's 1x1 convs an op's row stands for (its "(xN)")."""
    return int(op.split("(x")[1].split(")")[0])


if __name__ == "__main__":
    measure_both(__doc__, __file__, kdep_jax_ops, pytorch_ops, f"1x1 conv weight gradients, batch {BATCH}",
                 print_totals)
