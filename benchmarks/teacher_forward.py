"""Images/s of a teacher's forward pass: kdep_jax against PyTorch, eval mode, per arch.

What the distillation runs for its teacher: kdep_jax computes features["pre_relu"] as `teacher.outputs_fn` does, under
jax.jit (the XLA flag defaults of `python -m kdep_jax.main` applied), in chunks of at most --forward-chunk images (by
default kdep_jax's measured default for the arch and the device); PyTorch runs the torchvision model (EfficientNet-Lite:
the efficientnet-lite-pytorch package's) with its head, a negligible part, under torch.inference_mode, in channels_last
memory format, PyTorch's fast CPU path for convolutions, in each configuration of --pytorch-configs: eager
(`channels_last`) and `torch.compile` with Inductor's freezing of the frozen weights (`compile_freezing`: BatchNorm
folded into the convs, their bias and activation fused into oneDNN's kernels). kdep_jax is compared with the faster.
Each framework, configuration and arch runs in its own child process; median over timed repetitions after warm-up (which
includes compiling), random weights, synthetic images.

    python benchmarks/teacher_forward.py   # resnet50, vit_b_16, swin_t, convnext_tiny, efficientnet_lite0
    python benchmarks/teacher_forward.py --arch resnet50 --batch 32 --pytorch-configs channels_last,compile_freezing
    python benchmarks/teacher_forward.py --arch vit_b_16 --batch 32 --device gpu --dtype bfloat16
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

from distill_step import cpu_name

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


PYTORCH_CONFIGS = ("channels_last", "compile_freezing")


def kdep_jax_forward(args) -> float:
    """Median seconds per batch of kdep_jax's jitted teacher forward."""
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()
    import jax
    import jax.numpy as jnp

    from kdep_jax import config_lib
    from kdep_jax import teacher as teacher_lib

    config = config_lib.kdep_config()
    config.teacher.update(arch=args.arch, forward_chunk=args.forward_chunk)
    config.dtype = args.dtype
    images = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.image_size, args.image_size, 3)),
                         jnp.float32)
    variables = jax.jit(teacher_lib.model(config).init)(jax.random.key(0), images[:1])
    forward = jax.jit(teacher_lib.outputs_fn(config, ("pre_relu",)))
    return timed(lambda: jax.block_until_ready(forward(variables, images)), args)


def pytorch_forward(args) -> float:
    """Median seconds per batch of the torchvision model in eval mode, in args.pytorch_config."""
    import torch
    import torchvision

    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    if args.arch.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(args.arch.replace("_", "-"))
    else:
        model = getattr(torchvision.models, args.arch)()
    model = model.eval().to(device, memory_format=torch.channels_last)
    if args.pytorch_config == "compile_freezing":
        import torch._inductor.config

        torch._inductor.config.freezing = True
        model = torch.compile(model)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    images = images.to(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def run():
        with torch.inference_mode(), autocast:
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(run, args)


def timed(run, args) -> float:
    times = []
    for index in range(args.warmup + args.repeats):
        start = time.perf_counter()
        run()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_child(framework: str, arch: str, args, pytorch_config: str = "channels_last") -> float | None:
    """One framework's seconds per batch for arch, measured in a fresh process; None when it fails."""
    command = [sys.executable, __file__, "--framework", framework, "--arch", arch, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--device", args.device, "--dtype", args.dtype,
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--pytorch-config", pytorch_config]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(f"{framework} {arch} failed:\n{completed.stderr[-3000:]}")
        return None
    return float(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50,vit_b_16,swin_t,convnext_tiny,efficientnet_lite0",
                        help="comma-separated archs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--forward-chunk", type=int, default=None,
                        help="kdep_jax's config.teacher.forward_chunk: at most this many images per device in each "
                        "chunk, 0 for the whole batch (default: the measured default for the arch and the device)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--framework", default="both", choices=["both", "kdep_jax", "pytorch"],
                        help="kdep_jax or pytorch: one arch in this process; prints seconds per batch (a child's mode)")
    parser.add_argument("--pytorch-configs", default=",".join(PYTORCH_CONFIGS),
                        help=f"comma-separated, of {', '.join(PYTORCH_CONFIGS)}")
    parser.add_argument("--pytorch-config", default="channels_last", choices=PYTORCH_CONFIGS,
                        help="a child's PyTorch configuration (internal)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per arch instead of text")
    args = parser.parse_args()

    if args.framework != "both":  # a child: one framework, one arch; prints seconds per batch
        if "," in args.arch:
            parser.error(f"--framework {args.framework} times one arch; give one, or --framework both for several")
        print((kdep_jax_forward if args.framework == "kdep_jax" else pytorch_forward)(args))
        return
    configs = args.pytorch_configs.split(",")
    unknown = sorted(set(configs) - set(PYTORCH_CONFIGS))
    if unknown:
        parser.error(f"unknown --pytorch-configs {unknown}; known: {', '.join(PYTORCH_CONFIGS)}")
    if not args.json:
        print(f"teacher forward, batch {args.batch}, {args.image_size} px, {args.dtype}, {args.device} ({cpu_name()}), "
              f"{os.cpu_count()} CPUs, median of {args.repeats} after {args.warmup} warm-up")
    for arch in args.arch.split(","):
        result = {"arch": arch}
        seconds = run_child("kdep_jax", arch, args)
        if seconds is not None:
            result["kdep_jax_images_per_sec"] = args.batch / seconds
        for config in configs:
            seconds = run_child("pytorch", arch, args, config)
            if seconds is not None:
                result[f"pytorch_{config}_images_per_sec"] = args.batch / seconds
        pytorch = {config: result[f"pytorch_{config}_images_per_sec"] for config in configs
                   if f"pytorch_{config}_images_per_sec" in result}
        if pytorch and "kdep_jax_images_per_sec" in result:
            result["pytorch_best_config"] = max(pytorch, key=pytorch.get)
            result["kdep_jax_over_pytorch_best"] = result["kdep_jax_images_per_sec"] / max(pytorch.values())
        if args.json:
            print(json.dumps(result))
            continue
        rates = {name.removesuffix("_images_per_sec"): value for name, value in result.items()
                 if name.endswith("_images_per_sec")}
        line = f"  {arch:14s}" + "".join(f" {name} {value:7.1f}" for name, value in rates.items()) + " images/s"
        if "kdep_jax_over_pytorch_best" in result:
            best, ratio = result["pytorch_best_config"], result["kdep_jax_over_pytorch_best"]
            line += f"  kdep_jax / PyTorch {best} = {ratio:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
