"""Where a ResNet-18 training step's time goes on CPU: each of its ops alone, kdep_jax against PyTorch.

The student's forward and backward is most of the distillation step after the teacher's forward
(benchmarks/README.md). This times, at the step's shapes (batch 32, 224 px, float32), every kind of op that
step runs: the stem conv (forward and the weight gradient; the images need no gradient), the stem max-pool
(forward and backward), BatchNorm + ReLU in train mode (forward and backward), and each distinct 3x3 conv
(forward, input gradient, weight gradient). kdep_jax's side is what its models run (the XLA flags of `python -m
kdep_jax.main`, `kdep_jax.models.layers.max_pool`, flax's BatchNorm), each op its own jitted function; PyTorch's
is channels_last (its fast CPU layout), the gradients from `aten.convolution_backward`. Each framework runs in
its own child process; median milliseconds over timed repetitions after one warm-up.

    python benchmarks/resnet18_ops.py
    python benchmarks/resnet18_ops.py --framework kdep_jax --repeats 9
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

BATCH = 32
# (input size, input channels, output channels, stride) of ResNet-18's distinct 3x3 convs; "x n": how many
# of each one step runs (each block has two; the first of stages 2-4 is strided).
CONVS = [(56, 64, 64, 1, 4), (56, 64, 128, 2, 1), (28, 128, 128, 1, 3), (28, 128, 256, 2, 1), (14, 256, 256, 1, 3),
         (14, 256, 512, 2, 1), (7, 512, 512, 1, 3)]


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def kdep_jax_ops(repeats: int) -> dict[str, float]:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax
    import jax.numpy as jnp

    from kdep_jax.models import layers
    from kdep_jax.models.layers import BatchNorm, max_pool

    rng = np.random.default_rng(0)

    def array(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def timed(fn, *args):
        compiled = jax.jit(fn)
        return median_ms(lambda: jax.block_until_ready(compiled(*args)), repeats)

    def conv(x, kernel, stride):  # conv2d's: XLA's conv, or one whose weight gradient is kdep_jax's C++ kernel
        pad = kernel.shape[0] // 2
        return layers._flax_conv(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def conv_times(size, channels, features, stride, kernel_size=3, input_gradient=True):
        x, kernel = array(BATCH, size, size, channels), array(kernel_size, kernel_size, channels, features)
        grad = array(*conv(x, kernel, stride).shape)
        times = {"forward": timed(lambda x, k: conv(x, k, stride), x, kernel),
                 "weight gradient": timed(lambda x, k, g: jax.vjp(lambda k: conv(x, k, stride), k)[1](g)[0],
                                          x, kernel, grad)}
        if input_gradient:
            times["input gradient"] = timed(lambda x, k, g: jax.vjp(lambda x: conv(x, k, stride), x)[1](g)[0],
                                            x, kernel, grad)
        return times

    results = {f"stem conv 7x7/2 3->64, {k}": v
               for k, v in conv_times(224, 3, 64, 2, kernel_size=7, input_gradient=False).items()}
    x = array(BATCH, 112, 112, 64)
    pool_grad = array(BATCH, 56, 56, 64)
    for shifted in (True, False):
        variant = " [kdep_jax's strided slices]" if shifted else " [flax's reduce-window]"
        results["max-pool 3x3/2 112->56, forward" + variant] = timed(lambda x: max_pool(x, 3, 2, 1, shifted), x)
        results["max-pool 3x3/2 112->56, forward+backward" + variant] = timed(
            lambda x, g: jax.vjp(lambda x: max_pool(x, 3, 2, 1, shifted), x)[1](g)[0], x, pool_grad)
    for size in (112, 56):
        x = array(BATCH, size, size, 64)
        bn = BatchNorm()
        variables = bn.init(jax.random.key(0), x, train=False)

        def bn_relu(params, x, bn=bn, variables=variables):
            out, _ = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                              mutable=["batch_stats"])
            return jax.nn.relu(out)

        grad = array(*x.shape)
        results[f"BatchNorm+ReLU train {size}x{size}x64, forward"] = timed(bn_relu, variables["params"], x)
        results[f"BatchNorm+ReLU train {size}x{size}x64, forward+backward"] = timed(
            lambda p, x, g: jax.vjp(bn_relu, p, x)[1](g), variables["params"], x, grad)
    for size, channels, features, stride, count in CONVS:
        for kind, ms in conv_times(size, channels, features, stride).items():
            results[f"conv 3x3/{stride} {size}px {channels}->{features} (x{count}), {kind}"] = ms
    return results


def pytorch_ops(repeats: int) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    channels_last = torch.channels_last

    def array(*shape):
        return torch.randn(*shape).to(memory_format=channels_last) if len(shape) == 4 else torch.randn(*shape)

    def conv_times(size, channels, features, stride, kernel_size=3, input_gradient=True):
        x = array(BATCH, channels, size, size)
        weight = torch.randn(features, channels, kernel_size, kernel_size).to(memory_format=channels_last)
        pad = kernel_size // 2
        grad = torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad).contiguous(memory_format=channels_last)

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(grad, x, weight, None, [stride, stride], [pad, pad],
                                                               [1, 1], False, [0, 0], 1, mask)

        with torch.no_grad():
            times = {"forward": median_ms(lambda: torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad),
                                          repeats),
                     "weight gradient": median_ms(backward([False, True, False]), repeats)}
            if input_gradient:
                times["input gradient"] = median_ms(backward([True, False, False]), repeats)
        return times

    results = {f"stem conv 7x7/2 3->64, {k}": v
               for k, v in conv_times(224, 3, 64, 2, kernel_size=7, input_gradient=False).items()}
    x = array(BATCH, 64, 112, 112).requires_grad_()
    pool_grad = array(BATCH, 64, 56, 56)
    with torch.no_grad():
        results["max-pool 3x3/2 112->56, forward"] = median_ms(lambda: torch.nn.functional.max_pool2d(x, 3, 2, 1),
                                                               repeats)
    results["max-pool 3x3/2 112->56, forward+backward"] = median_ms(
        lambda: torch.autograd.grad(torch.nn.functional.max_pool2d(x, 3, 2, 1), x, pool_grad), repeats)
    for size in (112, 56):
        bn = torch.nn.BatchNorm2d(64).to(memory_format=channels_last).train()
        x = array(BATCH, 64, size, size).requires_grad_()
        grad = array(BATCH, 64, size, size)
        with torch.no_grad():
            results[f"BatchNorm+ReLU train {size}x{size}x64, forward"] = median_ms(lambda: torch.relu(bn(x)), repeats)
        results[f"BatchNorm+ReLU train {size}x{size}x64, forward+backward"] = median_ms(
            lambda: torch.autograd.grad(torch.relu(bn(x)), [x, *bn.parameters()], grad), repeats)
    for size, channels, features, stride, count in CONVS:
        for kind, ms in conv_times(size, channels, features, stride).items():
            results[f"conv 3x3/{stride} {size}px {channels}->{features} (x{count}), {kind}"] = ms
    return results


def measure_both(doc: str, script: str, kdep_jax_ops, pytorch_ops, what: str, print_rows,
                 dtype: str = "float32") -> None:
    """The command line the op benchmarks share. With --framework kdep_jax|pytorch (a child), times that framework
    and prints its results. Otherwise runs `script` once per framework, each in its own process, prints a heading
    naming `what` and the CPU and a table header, then `print_rows(kdep_jax's results, PyTorch's)`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default="both", choices=["both", "kdep_jax", "pytorch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.framework != "both":
        results = (kdep_jax_ops if args.framework == "kdep_jax" else pytorch_ops)(args.repeats)
        print(json.dumps(results) if args.json else "\n".join(f"{k}: {v} ms" for k, v in results.items()))
        return
    children = [subprocess.run([sys.executable, script, "--framework", framework, "--repeats", str(args.repeats),
                                "--json"], capture_output=True, text=True, check=True)
                for framework in ("kdep_jax", "pytorch")]
    ours, theirs = (json.loads(child.stdout.strip().splitlines()[-1]) for child in children)
    from distill_step import cpu_name

    print(f"{what}, {dtype}, {cpu_name()}, {len(os.sched_getaffinity(0))} cores, median of {args.repeats} (ms)")
    print("| op | kdep_jax ms | PyTorch channels_last ms | kdep_jax time / PyTorch time |\n|---|---:|---:|---:|")
    print_rows(ours, theirs)


def print_rows(ours: dict[str, float], theirs: dict[str, float]) -> None:
    for name, ms in ours.items():
        reference = theirs.get(name.split(" [")[0])  # PyTorch has one max-pool
        ratio = f"{ms / reference:.2f}x" if reference else ""
        print(f"| {name} | {ms} | {reference or ''} | {ratio} |")


if __name__ == "__main__":
    measure_both(__doc__, __file__, kdep_jax_ops, pytorch_ops, f"ResNet-18 ops, batch {BATCH}", print_rows)
