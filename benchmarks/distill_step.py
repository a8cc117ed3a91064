"""Images/s of the KDEP distillation step (teacher forward + student forward/backward + SGD update).

kdep_jax's own step (the one the trainer runs) and the same step written plainly in PyTorch with
torchvision models, one after the other in the same invocation, each in its own child process (so each
one's peak memory is its own), on synthetic images (this measures the step, not the input pipeline).
With --input jpeg, kdep_jax's repetitions instead take their batches from the real input pipeline
(JPEGs decoded, cropped and flipped by `kdep_jax.data.train_batches`, then sharded): if that is no slower
than the synthetic step, the input pipeline is not the bottleneck. Median over timed repetitions after
warm-up. Memory: peak device memory on a GPU, peak process RSS on a CPU. On a GPU it also prints
kdep_jax's model FLOP utilisation (XLA's FLOP count of the compiled step).

    python benchmarks/distill_step.py --student resnet18 --batch 32 --image-size 224
    python benchmarks/distill_step.py --device gpu --student mobilenet_v2 --batch 256 --dtype bfloat16
    python benchmarks/distill_step.py --target-cache   # also the step with cached teacher targets
    python benchmarks/distill_step.py --framework kdep_jax --input jpeg   # kdep_jax fed by the input pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STUDENT_DIM = {"resnet18": 512, "mobilenet_v2": 1280}  # torchvision's pooled feature widths

# Dense peak FLOP/s of the GPUs the project is measured on (NVIDIA's datasheets, SXM parts), for the MFU.
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12}}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def kdep_jax_step(args) -> dict:
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()  # what `python -m kdep_jax.main` runs with; XLA_FLAGS set here win
    import jax

    from kdep_jax import alignment as alignment_lib
    from kdep_jax import config_lib, distill, methods, models, optim, parallel, target_cache, trainer
    from kdep_jax import teacher as teacher_lib

    config = config_lib.kdep_config()
    config.student.arch = args.student
    config.dtype = args.dtype
    config.train.batch_size = args.batch
    mesh = parallel.make_mesh()
    method = methods.create(config)
    dim = method.dim
    teacher = teacher_lib.Teacher(trainer.init_variables(teacher_lib.model(config), args.image_size, 1), "", None)
    teacher_dim = models.feature_dim(config.teacher.arch)
    components = np.linalg.qr(np.random.default_rng(0).normal(size=(teacher_dim, teacher_dim)))[0][:, :dim]
    alignment = alignment_lib.Alignment(mean=np.zeros(teacher_dim, np.float32),
                                        components=components.astype(np.float32),
                                        singular_values=np.ones(dim, np.float32), count=1)
    tx = optim.sgd(optim.step_decay_schedule(0.1, 100, 30, 0.1, 90), 0.9, 5e-4)
    config.data.image_size = args.image_size
    state = trainer.create_train_state(distill.initial_variables(config, method, teacher, alignment), tx, mesh, seed=0)
    cached = args.framework == "kdep_jax_cached"  # the teacher's targets come with the batch (target cache)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, None, cached_targets=cached), tx, mesh)
    constants = () if cached else parallel.replicate((teacher.variables, alignment), mesh)
    host_batches = jpeg_batches(args) if args.input == "jpeg" else synthetic_batches(args)
    rng = np.random.default_rng(0)

    def next_batch():
        batch = {"image": next(host_batches)["image"]}
        if cached:
            batch["targets"] = rng.normal(size=(args.batch, dim)).astype(np.float16)
        return parallel.shard_batch(batch, mesh)

    flops = (step.lower(state, next_batch(), constants).compile().cost_analysis() or {}).get("flops")
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        state, metrics = step(state, next_batch(), constants)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "device_kind": jax.devices()[0].device_kind}
    if cached:
        result["cache_bytes_per_image_epoch"] = target_cache.bytes_per_image_epoch(dim)
    if args.device == "gpu":
        result["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
        peak = next((v for k, v in PEAK_FLOPS.items() if k in result["device_kind"]), None)
        if flops and peak:
            result["mfu"] = flops / result["seconds"] / peak[args.dtype]
    else:
        result["peak_bytes"] = peak_rss_bytes()
    return result


def synthetic_batches(args):
    image = np.random.default_rng(0).normal(size=(args.batch, args.image_size, args.image_size, 3))
    batch = {"image": image.astype(np.float32)}
    while True:
        yield batch


def jpeg_batches(args):
    """Batches from the real input pipeline, over 400x350 JPEGs written to a temporary folder."""
    import tempfile

    from input_pipeline import write_images

    from kdep_jax import config_lib, data

    with tempfile.TemporaryDirectory(prefix="kdep_bench_jpegs_") as root:
        write_images(root, num_images=(args.warmup + args.repeats + 2) * args.batch, width=400, height=350)
        config = config_lib.data_config()
        config.name, config.data_dir, config.split, config.image_size = "image_folder", root, "train", args.image_size
        yield from data.train_batches(config, "train", args.batch, seed=0, process_index=0, process_count=1)


def pytorch_pre_relu(model):
    """Hooks that capture torchvision's pooled pre-ReLU feature; returns a function that reads it."""
    import torchvision

    captured = {}
    if isinstance(model, torchvision.models.ResNet):
        block = model.layer4[-1]  # its residual sum: last BN output + the block's input (no downsample)
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        block.register_forward_hook(lambda module, inputs, output: captured.__setitem__("identity", inputs[0]))
        last_bn.register_forward_hook(lambda module, inputs, output: captured.__setitem__("branch", output))
        return lambda: (captured["branch"] + captured["identity"]).mean((2, 3))
    model.features[-1][1].register_forward_hook(lambda module, inputs, output: captured.__setitem__("bn", output))
    return lambda: captured["bn"].mean((2, 3))


def pytorch_step(args) -> dict:
    """The original's step, plainly: teacher under no_grad in eval mode, student in train mode, SGD.

    bfloat16 is torch.autocast (float32 parameters and loss), the usual PyTorch mixed precision.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    teacher = torchvision.models.resnet50().eval().to(device)
    student = getattr(torchvision.models, args.student)().train().to(device)
    teacher_feature, student_feature = pytorch_pre_relu(teacher), pytorch_pre_relu(student)
    dim = STUDENT_DIM[args.student]
    mean = torch.zeros(2048, device=device)
    components = torch.linalg.qr(torch.randn(2048, 2048))[0][:, :dim].to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            teacher(images)
            z = (teacher_feature().float() - mean) @ components
            targets = torch.sign(z) * (z / 0.1).abs().pow(1 / 3)
        with autocast:
            student(images)
        loss = 20.0 * torch.nn.functional.mse_loss(student_feature().float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the step, as block_until_ready does on the JAX side
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times)}
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return result


def run_child(framework: str, argv: list[str]) -> dict | None:
    """One framework's measurement in a fresh process; None when it cannot run (e.g. no torch)."""
    command = [sys.executable, __file__, *argv, "--framework", framework, "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(f"{framework} failed:\n{completed.stderr[-3000:]}")
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="resnet18", choices=["resnet18", "mobilenet_v2"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--input", default="synthetic", choices=["synthetic", "jpeg"],
                        help="kdep_jax's batches: one synthetic batch, or the real input pipeline over JPEGs")
    parser.add_argument("--target-cache", action="store_true",
                        help="also time kdep_jax's step with cached teacher targets (no teacher forward)")
    parser.add_argument("--framework", default="both", choices=["both", "kdep_jax", "kdep_jax_cached", "pytorch"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    if args.framework != "both":  # a child: measure one framework, print its JSON
        print(json.dumps((pytorch_step if args.framework == "pytorch" else kdep_jax_step)(args)))
        return
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--target-cache")]
    results = {"student": args.student, "teacher": "resnet50", "device": args.device, "batch": args.batch,
               "image_size": args.image_size, "dtype": args.dtype, "input": args.input, "cpus": os.cpu_count()}
    for framework in ("kdep_jax", "kdep_jax_cached", "pytorch"):
        if framework == "kdep_jax_cached" and not args.target_cache:
            continue
        measured = run_child(framework, argv)
        if measured is not None:
            results[f"{framework}_images_per_sec"] = args.batch / measured.pop("seconds")
            results.update({f"{framework}_{key}": value for key, value in measured.items()})
    if "kdep_jax_images_per_sec" in results and "pytorch_images_per_sec" in results:
        results["speedup_vs_pytorch"] = results["kdep_jax_images_per_sec"] / results["pytorch_images_per_sec"]
    if "kdep_jax_cached_images_per_sec" in results:
        results["cache_speedup"] = results["kdep_jax_cached_images_per_sec"] / results["kdep_jax_images_per_sec"]
    if args.json:
        print(json.dumps(results))
        return
    memory = "peak device memory" if args.device == "gpu" else "peak RSS"
    print(f"resnet50 -> {args.student}, batch {args.batch}, {args.image_size} px, {args.dtype}, {args.device} "
          f"({results.get('kdep_jax_device_kind', '?')}), {results['cpus']} CPUs, kdep_jax input {args.input}")
    for framework, label in (("kdep_jax", "kdep_jax"), ("kdep_jax_cached", "kdep_jax, cached targets"),
                             ("pytorch", "PyTorch ")):
        if f"{framework}_images_per_sec" in results:
            line = (f"  {label}: {results[f'{framework}_images_per_sec']:.1f} images/s, {memory} "
                    f"{results[f'{framework}_peak_bytes'] / 2**30:.2f} GiB")
            if f"{framework}_mfu" in results:
                line += f", MFU {100 * results[f'{framework}_mfu']:.1f}%"
            print(line)
    if "speedup_vs_pytorch" in results:
        print(f"  kdep_jax / PyTorch = {results['speedup_vs_pytorch']:.2f}x")
    if "cache_speedup" in results:
        print(f"  target cache: {results['cache_speedup']:.2f}x the online step, "
              f"{results['kdep_jax_cached_cache_bytes_per_image_epoch']} bytes per image per epoch")


if __name__ == "__main__":
    main()
