"""Images/s of the KDEP distillation step (teacher forward + student forward/backward + SGD update).

kdep_jax's own step (the one the trainer runs) and the same step in PyTorch with torchvision models, in
each of the PyTorch configurations of --pytorch-configs (eager NCHW, channels_last, torch.compile; the fastest
non-eager one is PyTorch at its best), one after the other in the same invocation, each in its own child process (so each
one's peak memory is its own), on synthetic images (this measures the step, not the input pipeline).
With --input jpeg, kdep_jax's repetitions instead take their batches from the real input pipeline
(JPEGs decoded, cropped and flipped by `kdep_jax.data.train_batches`, then sharded): if that is no slower
than the synthetic step, the input pipeline is not the bottleneck. Median over timed repetitions after
warm-up. Memory: peak device memory on a GPU, peak process RSS on a CPU. On a GPU it also prints
each step's model FLOP utilisation (XLA's FLOP count of kdep_jax's step, traced for the CPU in a process of its
own), on a CPU each step's share of the float32 FMA peak. The figures, per CPU family, are in benchmarks/README.md.

    python benchmarks/distill_step.py --student resnet18 --batch 32 --image-size 224
    python benchmarks/distill_step.py --device gpu --student mobilenet_v2 --batch 256 --dtype bfloat16
    python benchmarks/distill_step.py --target-cache   # also the step with cached teacher targets
    python benchmarks/distill_step.py --teacher-dtype bfloat16   # a float32 student, the teacher in bfloat16
    python benchmarks/distill_step.py --teacher swin_t --batch 8   # a transformer teacher (or vit_b_16)
    python benchmarks/distill_step.py --framework kdep_jax --input jpeg   # kdep_jax fed by the input pipeline
    python benchmarks/distill_step.py --preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4  # both on TCMalloc
    python benchmarks/distill_step.py --runs 3 --target-cache   # three runs: each figure's median and range

kdep_jax runs its steps as its trainer does, config.steps_per_call of them per call (--steps-per-call), and
--warmup and --repeats count its calls; each timed call gives its seconds per step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from unittest import mock

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

STUDENT_DIM = {"resnet18": 512, "mobilenet_v2": 1280}  # torchvision's pooled feature widths
TEACHER_DIM = {"resnet50": 2048, "vit_b_16": 768, "swin_t": 768}

# Dense peak FLOP/s of the GPUs the project is measured on (NVIDIA's datasheets, SXM parts), for the MFU. float32's
# is TF32's on the tensor cores: JAX's default precision runs float32 convs and dots there, and PyTorch's cuDNN convs.
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 495e12}, "H200": {"bfloat16": 989e12, "float32": 495e12}}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (or of the text given)."""
    if cpuinfo is None:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpuinfo = f.read()
    fields = (line.split(":", 1) for line in cpuinfo.splitlines()[:40] if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


def cpu_fp32_peak_flops(cpuinfo: str | None = None) -> tuple[float, str]:
    """float32 FMA peak of this machine's CPUs: cores x GHz x 2 FMA units x lanes (16 with AVX-512, else 8) x 2.

    From /proc/cpuinfo: the cores this process may use, the first "cpu MHz" (under a hypervisor the
    nominal clock; turbo is not counted) and the "flags" line. Two FMA units per core is what current
    server cores have (Intel Xeon Scalable Gold/Platinum, AMD Zen); a part with one makes the share 2x low.
    AMD's Zen 4 (family 25 with AVX-512) runs each 512-bit FMA as two 256-bit halves, so it counts 8 lanes.
    """
    fields = cpuinfo_fields(cpuinfo)
    ghz = float(fields.get("cpu MHz", "nan")) / 1000
    zen4 = fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
    lanes = 16 if "avx512f" in fields.get("flags", "").split() and not zen4 else 8
    cores = len(os.sched_getaffinity(0))
    return cores * ghz * 2 * lanes * 2 * 1e9, f"{cores} cores x {ghz:.2f} GHz x 2 FMA units x {lanes} lanes x 2"


def peak_shares(results: dict, keys, peak_flops: float, name: str) -> dict:
    """{key_name: XLA's FLOP count of that step / its seconds / peak_flops}: each step's share of the CPU's float32 FMA
    peak (name "fma_peak_share"), or of the GPU's peak (name "mfu", the model FLOP utilisation).

    PyTorch's configurations run the online kdep_jax step, so they take its count; the step with cached targets
    (no teacher forward) has its own, about half of it for ResNet-50 -> ResNet-18.
    """
    shares = {}
    for key in keys:
        flops = results.get(f"{key}_flops") or results.get("kdep_jax_flops")
        if flops and f"{key}_images_per_sec" in results:
            seconds = results["batch"] / results[f"{key}_images_per_sec"]
            shares[f"{key}_{name}"] = flops / seconds / peak_flops
    return shares


def gpu_peak_flops(device_kind: str, dtype: str) -> float | None:
    """The dense peak of a GPU named in PEAK_FLOPS (by JAX's device_kind, "NVIDIA H200" say) for dtype."""
    return next((peaks[dtype] for gpu, peaks in PEAK_FLOPS.items() if gpu in device_kind), None)


def kdep_jax_setup(args, cached: bool):
    """kdep_jax's steps as its trainer builds them, with XLA's flags set first as `python -m kdep_jax.main` sets
    them: (the jitted call of args.steps_per_call steps, the train state, the replicated step count and teacher
    constants, a function giving the next call's sharded batches). cached: the teacher's targets come with the
    batch (the target cache) and the step skips the teacher."""
    os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()  # what `python -m kdep_jax.main` runs with; XLA_FLAGS set here win
    from kdep_jax import alignment as alignment_lib
    from kdep_jax import config_lib, distill, methods, models, optim, parallel, trainer
    from kdep_jax import teacher as teacher_lib

    config = config_lib.kdep_config()
    config.teacher.arch = args.teacher
    config.teacher.forward_chunk = args.teacher_forward_chunk
    config.student.arch = args.student
    config.dtype = args.dtype
    config.teacher.dtype = args.teacher_dtype
    config.train.batch_size = args.batch
    mesh = parallel.make_mesh()
    method = methods.create(config)
    dim = method.dim
    teacher = teacher_lib.Teacher(trainer.init_variables(teacher_lib.model(config), args.image_size, 1), "", None)
    teacher_dim = models.feature_dim(config.teacher.arch)
    components = np.linalg.qr(np.random.default_rng(0).normal(size=(teacher_dim, dim)))[0]  # orthonormal columns
    alignment = alignment_lib.Alignment(mean=np.zeros(teacher_dim, np.float32),
                                        components=components.astype(np.float32),
                                        singular_values=np.ones(dim, np.float32), count=1)
    tx = optim.sgd(optim.step_decay_schedule(0.1, 100, 30, 0.1, 90), 0.9, 5e-4)
    config.data.image_size = args.image_size
    state = trainer.create_train_state(distill.initial_variables(config, method, teacher, alignment), tx, mesh, seed=0)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, None, cached_targets=cached), tx, mesh,
                                   args.steps_per_call)
    count = parallel.replicate(np.int32(args.steps_per_call), mesh)
    constants = () if cached else parallel.replicate((teacher.variables, alignment), mesh)
    host_batches = jpeg_batches(args) if args.input == "jpeg" else synthetic_batches(args)
    rng = np.random.default_rng(0)

    def next_batch():
        batch = {"image": next(host_batches)["image"]}
        if cached:
            batch["targets"] = rng.normal(size=(args.batch, dim)).astype(np.float16)
        return batch

    def next_batches():
        return parallel.shard_batches([next_batch() for _ in range(args.steps_per_call)], mesh, args.steps_per_call)

    return step, state, count, constants, next_batches


def xla_flop_count(step, *step_args) -> float | None:
    """XLA's FLOP count of the step as traced, with kdep_jax's C++ convolution (the AMX one's too), attention and
    Linear-layer kernels off, before XLA compiles it for a device: a compiled step hides its convolutions in custom
    calls, which XLA counts as nothing (the C++ kernels on a CPU, cuDNN's on a GPU, where the compiled count was 0.1
    GFLOP per image for R50 -> R18). Within 1.2% of the compiled count with XLA's convolutions on a CPU (R50 -> R18,
    MobileNetV2; ViT-B/16 -> R18). None where the backend has no count before compilation: JAX's CUDA plugin
    (`kdep_jax_flop_count` counts on a CPU)."""
    import jax

    from kdep_jax.models import layers

    jax.clear_caches()  # trace the step again, with XLA's convolutions
    with contextlib.ExitStack() as stack:
        for form in ("_native_conv", "_native_conv_weight_gradient", "_native_weight_gradient",
                     "_native_input_gradient", "_native_attention", "_native_dense", "_amx_conv"):
            stack.enter_context(mock.patch.object(layers, form, lambda: False))
        flops = (step.lower(*step_args).cost_analysis() or {}).get("flops")
    jax.clear_caches()
    return flops


def kdep_jax_step(args) -> dict:
    cached = args.framework == "kdep_jax_cached"
    step, state, count, constants, next_batches = kdep_jax_setup(args, cached)
    import jax  # after the setup, which sets JAX_PLATFORMS and XLA_FLAGS

    from kdep_jax import target_cache, trainer

    # Synthetic images are placed on the device once, as PyTorch's are: stacking and placing a call's four float32
    # batches (617 MB at batch 256) takes 0.9 s on a 2-core AMD EPYC, more than the H200's whole call when it was
    # timed with them (0.41 s). From JPEGs each call's batches are read and placed while the device runs the call
    # before, as in the trainer.
    first_batches = batches = next_batches()
    times = []  # seconds per step
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        state, metrics = step(state, batches, count, constants)
        if args.input == "jpeg":
            batches = next_batches()
        if i == 0:  # as kdep_jax's trainer does once the step is compiled
            trainer.release_freed_host_memory()
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append((time.perf_counter() - start) / args.steps_per_call)
    result = {"seconds": statistics.median(times), "times": times, "device_kind": jax.devices()[0].device_kind,
              "steps_per_call": args.steps_per_call}
    if cached:
        result["cache_bytes_per_image_epoch"] = target_cache.bytes_per_image_epoch(first_batches["targets"].shape[-1])
    if args.device == "gpu":
        result["peak_bytes"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    else:
        result["peak_bytes"] = peak_rss_bytes()
    return result


def kdep_jax_flop_count(args) -> dict:
    """{"flops": XLA's count of kdep_jax's step (`xla_flop_count`)}, the step traced for a CPU whatever --device
    says: JAX's CUDA plugin counts nothing before compilation, so a GPU's step takes the count of the same step
    on the host's CPU. In a process of its own, so that the timed one's memory is the step's alone."""
    args.device, args.input = "cpu", "synthetic"
    # The teacher's forward pass at once: in chunks it is a loop, whose body XLA counts once (the same arithmetic).
    args.teacher_forward_chunk = 0
    step, state, count, constants, next_batches = kdep_jax_setup(args, args.framework == "kdep_jax_cached")
    return {"flops": xla_flop_count(step, state, next_batches(), count, constants)}


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


def pytorch_pre_relu_model(model):
    """A torch.nn.Module: the torchvision backbone `model` -> its pooled pre-ReLU feature (B, D), float32.

    The same feature as kdep_jax's features["pre_relu"]: ResNet's last residual sum before its ReLU,
    MobileNetV2's last 1x1 conv + BN before ReLU6, averaged over H, W; ViT's class token after the final
    LayerNorm, Swin's pooled final norm. Written as a plain forward (no hooks,
    no unused classifier) so that torch.compile traces it whole.
    """

    import torch
    import torchvision

    class PreReluFeature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            m = self.model
            if isinstance(m, torchvision.models.ResNet):
                x = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
                x = m.layer4[:-1](x)
                block = m.layer4[-1]
                identity = x if block.downsample is None else block.downsample(x)
                out = block.relu(block.bn1(block.conv1(x)))
                if hasattr(block, "bn3"):  # Bottleneck
                    out = block.bn3(block.conv3(block.relu(block.bn2(block.conv2(out)))))
                else:  # BasicBlock
                    out = block.bn2(block.conv2(out))
                return (out + identity).float().mean((2, 3))
            if isinstance(m, torchvision.models.VisionTransformer):  # the class token after the final LayerNorm
                x = m._process_input(x)
                x = m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1))
                return x[:, 0].float()
            if isinstance(m, torchvision.models.SwinTransformer):  # the pooled output of the final norm
                return m.flatten(m.avgpool(m.permute(m.norm(m.features(x))))).float()
            last = m.features[-1]  # Conv2dNormActivation(conv, bn, ReLU6)
            return last[1](last[0](m.features[:-1](x))).float().mean((2, 3))

    return PreReluFeature()


# PyTorch configurations of the same step (benchmarks/README.md has what each one measured).
# Each takes (teacher, student, images) built plainly (NCHW, eager) and returns them set up its way.


def pytorch_eager(teacher, student, images):
    """Plain eager PyTorch, NCHW: what the original KDEP code runs."""
    return teacher, student, images


def pytorch_channels_last(teacher, student, images):
    """Eager, NHWC (channels_last) model and input: oneDNN's native layout on CPU."""
    import torch

    return (teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last))


def pytorch_compiled(mode: str | None = None, freeze_teacher: bool = False):
    """channels_last, then torch.compile (Inductor; on CPU it needs a C++ compiler) of teacher and student."""

    def configure(teacher, student, images):
        import torch

        if freeze_teacher:  # Inductor's freezing: constant-folds the frozen teacher's weights (inference graphs)
            import torch._inductor.config

            torch._inductor.config.freezing = True
        teacher, student, images = pytorch_channels_last(teacher, student, images)
        return torch.compile(teacher, mode=mode), torch.compile(student, mode=mode), images

    return configure


PYTORCH_CONFIGS = {
    "eager": pytorch_eager,
    "channels_last": pytorch_channels_last,
    "compile": pytorch_compiled(),
    "compile_freezing": pytorch_compiled(freeze_teacher=True),
    "compile_max_autotune": pytorch_compiled("max-autotune-no-cudagraphs"),
    "compile_max_autotune_freezing": pytorch_compiled("max-autotune-no-cudagraphs", freeze_teacher=True),
}


def pytorch_step(args) -> dict:
    """The original's step: teacher under inference_mode in eval mode, student in train mode, SGD.

    args.pytorch_config picks how the models and input are set up (PYTORCH_CONFIGS). bfloat16 is
    torch.autocast (float32 parameters and loss), the usual PyTorch mixed precision; --teacher-dtype bfloat16 puts
    the teacher alone under it.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    torch.backends.cudnn.benchmark = True  # on a GPU: cuDNN's fastest algorithm for each conv, as fast code sets
    teacher = pytorch_pre_relu_model(getattr(torchvision.models, args.teacher)()).eval().to(device)
    student = pytorch_pre_relu_model(getattr(torchvision.models, args.student)()).train().to(device)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    dim = STUDENT_DIM[args.student]
    teacher_dim = TEACHER_DIM[args.teacher]
    mean = torch.zeros(teacher_dim, device=device)
    components = torch.linalg.qr(torch.randn(teacher_dim, dim))[0].to(device)  # orthonormal columns
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    teacher, student, images = PYTORCH_CONFIGS[args.pytorch_config](teacher, student, images)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    teacher_autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                      enabled=(args.teacher_dtype or args.dtype) == "bfloat16")
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.inference_mode(), teacher_autocast:
            z = (teacher(images) - mean) @ components
            targets = torch.sign(z) * (z / 0.1).abs().pow(1 / 3)
        targets = targets.clone()  # an ordinary tensor, usable by autograd
        with autocast:
            features = student(images)
        loss = 20.0 * torch.nn.functional.mse_loss(features.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_loss = loss.item()  # waits for the step, as block_until_ready does on the JAX side
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "times": times, "loss": last_loss}
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return result


def run_child(framework: str, argv: list[str], preload: str | None = None) -> dict | None:
    """One framework's measurement in a fresh process, with `preload` (a malloc library) preloaded into it; None
    when it cannot run (e.g. no torch)."""
    command = [sys.executable, __file__, *argv, "--framework", framework, "--json"]
    env = dict(os.environ, LD_PRELOAD=preload) if preload else None
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        sys.stderr.write(f"{framework} failed:\n{completed.stderr[-3000:]}")
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's models, device, batch, image size, dtype and steps per call (benchmarks/step_profile.py takes them
    too)."""
    from kdep_jax import config_lib  # no JAX: XLA's flags are set later, by kdep_jax_setup

    parser.add_argument("--student", default="resnet18", choices=sorted(STUDENT_DIM))
    parser.add_argument("--teacher", default="resnet50", choices=sorted(TEACHER_DIM))
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--teacher-dtype", choices=["float32", "bfloat16"],
                        help="the teacher's dtype, kdep_jax's config.teacher.dtype (default: --dtype)")
    parser.add_argument("--steps-per-call", type=int, default=config_lib.kdep_config().steps_per_call,
                        help="kdep_jax's steps per XLA execution (default: the trainer's, config.steps_per_call)")
    parser.add_argument("--teacher-forward-chunk", type=int, default=None,
                        help="kdep_jax's config.teacher.forward_chunk: at most this many images per device in each "
                        "chunk of the teacher's forward pass, 0 for the whole batch (default: the measured default "
                        "for the teacher and the device, teacher.forward_chunk)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (kdep_jax) or steps (PyTorch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (kdep_jax) or steps (PyTorch)")
    parser.add_argument("--input", default="synthetic", choices=["synthetic", "jpeg"],
                        help="kdep_jax's batches: one synthetic batch, or the real input pipeline over JPEGs")
    parser.add_argument("--target-cache", action="store_true",
                        help="also time kdep_jax's step with cached teacher targets (no teacher forward)")
    parser.add_argument("--framework", default="both", choices=["both", "kdep_jax", "kdep_jax_cached", "pytorch"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--count-flops", action="store_true",
                        help="(child, with --framework kdep_jax or kdep_jax_cached) count the step's FLOPs on a CPU")
    parser.add_argument("--pytorch-configs", default="eager,channels_last,compile_freezing",
                        help="PyTorch configurations to time, comma-separated (of: " + ", ".join(PYTORCH_CONFIGS)
                        + "); the fastest one other than eager is PyTorch's best")
    parser.add_argument("--pytorch-config", default="eager", choices=sorted(PYTORCH_CONFIGS),
                        help="(child) the PyTorch configuration to time")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--runs", type=int, default=1,
                        help="run the whole comparison this many times, one framework and configuration after the "
                        "other in each; then print each figure's median and range over the runs")
    parser.add_argument("--preload", help="a malloc library to preload (LD_PRELOAD) into every framework's process "
                        "(with --framework, into this one's), e.g. TCMalloc's libtcmalloc_minimal.so.4 as PyTorch's "
                        "CPU tuning guide advises")
    args = parser.parse_args()
    if args.preload and not os.path.isfile(args.preload):
        parser.error(f"--preload {args.preload}: no such file")
    if args.framework != "both":  # a child: measure one framework (or count its step's FLOPs), print its JSON
        if args.preload and os.environ.get("LD_PRELOAD") != args.preload:  # run by hand: load the library first
            os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, LD_PRELOAD=args.preload))
        measure = kdep_jax_flop_count if args.count_flops else kdep_jax_step
        print(json.dumps((pytorch_step if args.framework == "pytorch" else measure)(args)))
        return
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--target-cache")]
    configs = [c for c in args.pytorch_configs.split(",") if c]
    flops = flop_counts(args, argv)
    runs = [compare(args, argv, configs, flops) for _ in range(args.runs)]
    if args.json:
        print(json.dumps(runs[0] if args.runs == 1 else {"runs": runs, "summary": summarise(runs)}))
        return
    for number, results in enumerate(runs, 1):
        if args.runs > 1:
            print(f"run {number} of {args.runs}:")
        print_report(results, args, configs)
    if args.runs > 1:
        print_summary(summarise(runs), args, configs)


def flop_counts(args, argv: list[str]) -> dict:
    """{"kdep_jax_flops": XLA's count of kdep_jax's online step, "kdep_jax_cached_flops": of the step with cached
    targets (with --target-cache)}, each counted once for all runs, in a process of its own (`kdep_jax_flop_count`)."""
    frameworks = ["kdep_jax"] + (["kdep_jax_cached"] if args.target_cache else [])
    return {f"{framework}_flops": (run_child(framework, [*argv, "--count-flops"]) or {}).get("flops")
            for framework in frameworks}


def compare(args, argv: list[str], configs: list[str], flops: dict) -> dict:
    """One run of the comparison: each framework and configuration in its own process, one after the other; flops:
    the kdep_jax steps' FLOP counts (`flop_counts`)."""
    results = {**flops, "student": args.student, "teacher": args.teacher, "device": args.device, "batch": args.batch,
               "image_size": args.image_size, "dtype": args.dtype, "teacher_dtype": args.teacher_dtype or args.dtype,
               "input": args.input, "cpus": os.cpu_count(),
               "preload": args.preload}
    if args.device == "cpu":
        results["cpu"] = cpu_name()
        results["fp32_peak_flops"], results["fp32_peak_formula"] = cpu_fp32_peak_flops()
    children = [("kdep_jax", "kdep_jax", [])]
    if args.target_cache:
        children.append(("kdep_jax_cached", "kdep_jax_cached", []))
    children += [(f"pytorch_{c}", "pytorch", ["--pytorch-config", c]) for c in configs]
    for key, framework, extra in children:
        measured = run_child(framework, argv + extra, args.preload)
        if measured is not None:
            results[f"{key}_images_per_sec"] = args.batch / measured.pop("seconds")
            results.update({f"{key}_{name}": value for name, value in measured.items()})
    keys = [key for key, _, _ in children]
    if args.device == "cpu":
        results.update(peak_shares(results, keys, results["fp32_peak_flops"], "fma_peak_share"))
    elif peak_flops := gpu_peak_flops(results.get("kdep_jax_device_kind", ""), args.dtype):
        results["gpu_peak_flops"] = peak_flops
        results.update(peak_shares(results, keys, peak_flops, "mfu"))
    measured_configs = [c for c in configs if f"pytorch_{c}_images_per_sec" in results]
    candidates = [c for c in measured_configs if c != "eager"] or measured_configs
    if candidates:  # PyTorch at its best: the fastest configuration measured (eager only if alone)
        best = max(candidates, key=lambda c: results[f"pytorch_{c}_images_per_sec"])
        results["pytorch_best_config"] = best
        results["pytorch_images_per_sec"] = results[f"pytorch_{best}_images_per_sec"]
        results["pytorch_peak_bytes"] = results[f"pytorch_{best}_peak_bytes"]
    if "kdep_jax_images_per_sec" in results:
        for c in measured_configs:
            results[f"speedup_vs_pytorch_{c}"] = (results["kdep_jax_images_per_sec"]
                                                   / results[f"pytorch_{c}_images_per_sec"])
        if "pytorch_images_per_sec" in results:
            results["speedup_vs_pytorch"] = results["kdep_jax_images_per_sec"] / results["pytorch_images_per_sec"]
    if "kdep_jax_cached_images_per_sec" in results:
        results["cache_speedup"] = results["kdep_jax_cached_images_per_sec"] / results["kdep_jax_images_per_sec"]
    return results


def print_report(results: dict, args, configs: list[str]) -> None:
    memory = "peak device memory" if args.device == "gpu" else "peak RSS"
    device = results.get("cpu", results.get("kdep_jax_device_kind", "?"))
    dtype = args.dtype
    if (args.teacher_dtype or args.dtype) != args.dtype:
        dtype += f", teacher {args.teacher_dtype}"
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.image_size} px, {dtype}, {args.device} "
          f"({device}), {results['cpus']} CPUs, kdep_jax input {args.input}, {args.steps_per_call} steps per call"
          + (f", {os.path.basename(args.preload)} preloaded" if args.preload else ""))
    labels = [("kdep_jax", "kdep_jax"), ("kdep_jax_cached", "kdep_jax, cached targets")]
    labels += [(f"pytorch_{c}", f"PyTorch {c}" + (" (best)" if c == results.get("pytorch_best_config") else ""))
               for c in configs]

    def value(key: str, scale: float = 1.0, digits: int = 2) -> str:
        return f"{results[key] * scale:.{digits}f}"

    print("\n".join(figure_lines(results.__contains__, value, labels, configs, memory)))
    if results.get("kdep_jax_flops"):
        peak = ""
        if "fp32_peak_flops" in results:
            peak = f"float32 FMA peak {results['fp32_peak_flops'] / 1e9:.0f} GFLOP/s ({results['fp32_peak_formula']}); "
        elif "gpu_peak_flops" in results:
            peak = (f"the MFU's peak {results['gpu_peak_flops'] / 1e12:.0f} TFLOP/s (dense {args.dtype}, TF32 for "
                    "float32); ")
        print(f"  {peak}{results['kdep_jax_flops'] / args.batch / 1e9:.1f} GFLOP per image (XLA's count of kdep_jax's "
              "step)")
    if "cache_speedup" in results:
        print(f"  target cache: {results['cache_speedup']:.2f}x the online step, "
              f"{results['kdep_jax_cached_cache_bytes_per_image_epoch']} bytes per image per epoch")


def figure_lines(has, figure, labels: list[tuple[str, str]], configs: list[str], memory: str) -> list[str]:
    """Each framework's images/s, memory and shares of the peak, then kdep_jax's ratio to each PyTorch
    configuration: from one run's figures or from their medians over runs (has(key); figure(key, scale, digits))."""
    lines = []
    for key, label in labels:
        if has(f"{key}_images_per_sec"):
            line = (f"  {label}: {figure(f'{key}_images_per_sec')} images/s, {memory} "
                    f"{figure(f'{key}_peak_bytes', 1 / 2**30)} GiB")
            if has(f"{key}_mfu"):
                line += f", MFU {figure(f'{key}_mfu', 100, 1)}%"
            if has(f"{key}_fma_peak_share"):
                line += f", {figure(f'{key}_fma_peak_share', 100, 0)}% of the float32 FMA peak"
            lines.append(line)
    lines += [f"  kdep_jax / PyTorch {c} = {figure(f'speedup_vs_pytorch_{c}')}x" for c in configs
              if has(f"speedup_vs_pytorch_{c}")]
    return lines


SUMMARISED = ("_images_per_sec", "_peak_bytes", "_fma_peak_share", "_mfu", "cache_speedup")  # per-run figures


def summarise(runs: list[dict]) -> dict:
    """Each figure that every run has (images/s, peak memory, speed-ups, shares of the peak) as its median, min and
    max over the runs: a ratio's median is that of the runs' ratios, each measured within one run; and PyTorch's best
    configuration run by run."""
    summary = {}
    for key in runs[0]:
        if (key.endswith(SUMMARISED) or key.startswith("speedup_vs_pytorch")) and all(key in run for run in runs):
            values = [run[key] for run in runs]
            summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    summary["pytorch_best_configs"] = [run.get("pytorch_best_config") for run in runs]
    return summary


def print_summary(summary: dict, args, configs: list[str]) -> None:
    """The lines of a performance table: each figure's median over the runs, its range in brackets."""
    def spread(key: str, scale: float = 1.0, digits: int = 2) -> str:
        figure = summary[key]
        return (f"{figure['median'] * scale:.{digits}f} ({figure['min'] * scale:.{digits}f}-"
                f"{figure['max'] * scale:.{digits}f})")

    memory = "peak device memory" if args.device == "gpu" else "peak RSS"
    print(f"median of {len(summary['pytorch_best_configs'])} runs (range):")
    labels = [("kdep_jax", "kdep_jax"), ("kdep_jax_cached", "kdep_jax, cached targets"), ("pytorch", "PyTorch's best")]
    labels += [(f"pytorch_{c}", f"PyTorch {c}") for c in configs]
    print("\n".join(figure_lines(summary.__contains__, spread, labels, configs, memory)))
    if "speedup_vs_pytorch" in summary:
        print(f"  kdep_jax / PyTorch's best = {spread('speedup_vs_pytorch')}x (best: "
              f"{', '.join(str(c) for c in summary['pytorch_best_configs'])})")
    if "cache_speedup" in summary:
        print(f"  target cache: {spread('cache_speedup')}x the online step")


def cpu_name() -> str:
    """The CPU's model name, family and model (VMs often show a bare "AMD EPYC"), and the vector extensions that
    matter here, from /proc/cpuinfo."""
    try:
        fields = cpuinfo_fields()
    except OSError:
        return "?"
    flags = fields.get("flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{fields.get('model name', '?')}, family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"({', '.join(isa)})")


if __name__ == "__main__":
    main()
