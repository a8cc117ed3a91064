"""ResNet-50's convs in bfloat16 on an AMX CPU, each alone: kdep_jax's AMX kernel against PyTorch's (oneDNN's).

A bfloat16 teacher's forward pass on an Intel Xeon with AMX runs its convs through `cpu_kernels.amx_conv`, in the form
its ResNet block gives each (`layers.ConvOfActivation`): the conv alone, the conv of the BatchNorm and ReLU before it
(applied as the kernel reads x), or that and the block's end (the last BatchNorm's map, the residual, the ReLU, applied
as it writes). This times each distinct conv of torchvision's ResNet-50 at 224 px, batch 32, in its form, with the
XLA flags of `python -m kdep_jax.main`, and PyTorch's conv alone in bfloat16, channels_last (oneDNN's AMX kernels),
each framework in its own child process; median milliseconds over timed repetitions after one warm-up, and the
kernel's TFLOP/s. XLA gives each call's output fresh memory; glibc's malloc maps a large one anew each time, whose
pages then fault in (the step's loop reuses its memory), so run it on TCMalloc for the kernel's own time:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/amx_conv_ops.py
"""
from __future__ import annotations

import os
import sys

import numpy as np

from resnet18_ops import measure_both, median_ms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BATCH = 32
# (input size, input channels, output channels, kernel size, stride, form, how many ResNet-50 has), in its order;
# form: "conv" (a block's first conv, a downsampling one), "activation" (its BatchNorm and ReLU before), "block end".
CONVS = [(56, 64, 64, 1, 1, "conv", 1), (56, 256, 64, 1, 1, "conv", 2), (56, 64, 64, 3, 1, "activation", 3),
         (56, 64, 256, 1, 1, "block end", 3), (56, 64, 256, 1, 1, "conv", 1), (56, 256, 128, 1, 1, "conv", 1),
         (56, 128, 128, 3, 2, "activation", 1), (28, 512, 128, 1, 1, "conv", 3), (28, 128, 128, 3, 1, "activation", 3),
         (28, 128, 512, 1, 1, "block end", 4), (56, 256, 512, 1, 2, "conv", 1), (14, 1024, 256, 1, 1, "conv", 5),
         (14, 256, 256, 3, 1, "activation", 5), (14, 256, 1024, 1, 1, "block end", 6), (28, 512, 1024, 1, 2, "conv", 1),
         (7, 2048, 512, 1, 1, "conv", 2), (7, 512, 512, 3, 1, "activation", 2), (7, 512, 2048, 1, 1, "block end", 3),
         (14, 1024, 2048, 1, 2, "conv", 1)]


def name(size, channels, features, k, stride, form, count) -> str:
    return f"{k}x{k}/{stride} {size}px {channels}->{features} {form} (x{count})"


def out_size(size, k, stride) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def kdep_jax_ops(repeats: int) -> dict[str, float]:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax
    import jax.numpy as jnp

    from kdep_jax.models import cpu_kernels

    if not cpu_kernels.amx_runs_here():
        sys.exit("kdep_jax's AMX kernel does not run on this CPU (one with amx_tile and amx_bf16 is needed)")
    rng = np.random.default_rng(0)

    def array(*shape, dtype=jnp.bfloat16):
        return jnp.asarray(rng.normal(size=shape), dtype)

    results = {}
    for size, channels, features, k, stride, form, count in CONVS:
        pad = ((k // 2, k // 2),) * 2
        x, kernel = array(BATCH, size, size, channels), array(k, k, channels, features) * 0.05
        activation = (array(channels, dtype=jnp.float32), array(channels, dtype=jnp.float32))
        end = (array(features, dtype=jnp.float32), array(features, dtype=jnp.float32),
               array(BATCH, out_size(size, k, stride), out_size(size, k, stride), features))
        if form == "conv":
            call = jax.jit(lambda x, kernel, stride=stride, pad=pad: cpu_kernels.amx_conv(x, kernel, stride, pad))
        elif form == "activation":
            call = jax.jit(lambda x, kernel, stride=stride, pad=pad, activation=activation:
                           cpu_kernels.amx_conv(x, kernel, stride, pad, activation))
        else:
            call = jax.jit(lambda x, kernel, stride=stride, pad=pad, activation=activation, end=end:
                           cpu_kernels.amx_conv(x, kernel, stride, pad, activation, (*end, True)))
        results[name(size, channels, features, k, stride, form, count)] = median_ms(
            lambda call=call, x=x, kernel=kernel: jax.block_until_ready(call(x, kernel)), repeats)
    return results


def pytorch_ops(repeats: int) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    results = {}
    with torch.no_grad():
        for size, channels, features, k, stride, form, count in CONVS:
            x = torch.randn(BATCH, channels, size, size).to(torch.bfloat16, memory_format=torch.channels_last)
            weight = (torch.randn(features, channels, k, k) * 0.05).to(torch.bfloat16,
                                                                        memory_format=torch.channels_last)
            results[name(size, channels, features, k, stride, form, count)] = median_ms(
                lambda x=x, weight=weight, stride=stride, k=k: torch.nn.functional.conv2d(x, weight, stride=stride,
                                                                                          padding=k // 2), repeats)
    return results


def print_rows(ours: dict[str, float], theirs: dict[str, float]) -> None:
    total_ours = total_theirs = 0.0
    for (size, channels, features, k, stride, _, count), (row, ms) in zip(CONVS, ours.items()):
        flop = 2 * BATCH * out_size(size, k, stride) ** 2 * features * channels * k * k
        reference = theirs[row]
        total_ours, total_theirs = total_ours + count * ms, total_theirs + count * reference
        print(f"| {row} | {ms} ({flop / ms / 1e9:.2f} TFLOP/s) | {reference} | {ms / reference:.2f}x |")
    print(f"| ResNet-50's convs but the stem, per pass | {total_ours:.1f} | {total_theirs:.1f} | "
          f"{total_ours / total_theirs:.2f}x |")


if __name__ == "__main__":
    measure_both(__doc__, __file__, kdep_jax_ops, pytorch_ops, f"ResNet-50's convs on the AMX tiles, batch {BATCH}",
                 print_rows, dtype="bfloat16")
