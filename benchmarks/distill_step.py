"""Images/s of the KDEP distillation step (teacher forward + student forward/backward + SGD update).

kdep_jax's own step (the one the trainer runs) and the same step written plainly in PyTorch with
torchvision models, one after the other in the same invocation, on synthetic images (this measures the
step, not the input pipeline). Median over timed repetitions after warm-up.

    python benchmarks/distill_step.py --student resnet18 --batch 32 --image-size 224
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

try:  # torchvision crashes when imported after TensorFlow (which kdep_jax's input pipeline loads)
    import torchvision  # noqa: F401
except ImportError:
    torchvision = None


def kdep_jax_step_times(args) -> list[float]:
    import jax
    import numpy as np

    from kdep_jax import alignment as alignment_lib
    from kdep_jax import config_lib, distill, models, optim, parallel, trainer

    config = config_lib.kdep_config()
    config.student.arch = args.student
    config.dtype = args.dtype
    config.train.batch_size = args.batch
    mesh = parallel.make_mesh()
    dim = distill.student_dim(config)
    teacher_variables = trainer.init_variables(distill.teacher_model(config), args.image_size, 1)
    teacher_dim = models.feature_dim(config.teacher.arch)
    components = np.linalg.qr(np.random.default_rng(0).normal(size=(teacher_dim, teacher_dim)))[0][:, :dim]
    alignment = alignment_lib.Alignment(mean=np.zeros(teacher_dim, np.float32), components=components.astype(np.float32),
                                        singular_values=np.ones(dim, np.float32), count=1)
    tx = optim.sgd(optim.step_decay_schedule(0.1, 100, 30, 0.1, 90), 0.9, 5e-4)
    state = trainer.create_train_state(trainer.init_variables(distill.student_model(config), args.image_size, 0), tx, mesh)
    step = trainer.make_train_step(distill.make_loss_fn(config, dim), tx, mesh)
    constants = parallel.replicate((teacher_variables, alignment), mesh)
    images = np.random.default_rng(0).normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    batch = parallel.shard_batch({"image": images}, mesh)
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch, constants)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


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


def pytorch_step_times(args) -> list[float]:
    """The original's step, plainly: teacher under no_grad in eval mode, student in train mode, SGD."""
    import torch
    import torchvision

    torch.manual_seed(0)
    teacher = torchvision.models.resnet50().eval()
    student = getattr(torchvision.models, args.student)().train()
    teacher_feature, student_feature = pytorch_pre_relu(teacher), pytorch_pre_relu(student)
    dim = {"resnet18": 512, "mobilenet_v2": 1280}[args.student]
    mean = torch.zeros(2048)
    components = torch.linalg.qr(torch.randn(2048, 2048))[0][:, :dim]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            teacher(images)
            z = (teacher_feature() - mean) @ components
            targets = torch.sign(z) * (z / 0.1).abs().pow(1 / 3)
        student(images)
        loss = 20.0 * torch.nn.functional.mse_loss(student_feature(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="resnet18", choices=["resnet18", "mobilenet_v2"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-pytorch", action="store_true", help="only kdep_jax (no torch installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    results = {"student": args.student, "teacher": "resnet50", "batch": args.batch, "image_size": args.image_size,
               "dtype": args.dtype, "cpus": os.cpu_count()}
    jax_time = statistics.median(kdep_jax_step_times(args))
    results["kdep_jax_images_per_sec"] = args.batch / jax_time
    args.skip_pytorch |= torchvision is None
    if not args.skip_pytorch:
        torch_time = statistics.median(pytorch_step_times(args))
        results["pytorch_images_per_sec"] = args.batch / torch_time
        results["speedup_vs_pytorch"] = torch_time / jax_time
    if args.json:
        print(json.dumps(results))
    else:
        print(f"resnet50 -> {args.student}, batch {args.batch}, {args.image_size} px, {args.dtype}, "
              f"{results['cpus']} CPUs")
        print(f"  kdep_jax: {results['kdep_jax_images_per_sec']:.1f} images/s")
        if not args.skip_pytorch:
            print(f"  PyTorch:  {results['pytorch_images_per_sec']:.1f} images/s   "
                  f"(kdep_jax / PyTorch = {results['speedup_vs_pytorch']:.2f}x)")


if __name__ == "__main__":
    main()
