"""Images/s of the ScaleKD distillation step, with and without teacher parameter perception (config.scalekd.tpp).

The trainer's own step (teacher forward, student forward/backward through the projectors and, with TPP, through
the frozen teacher's last stage twice, SGD update) for configs/methods/scalekd_swin_t_r18.py (Swin-T -> ResNet-18),
on synthetic images and labels with a randomly initialised teacher (this measures the step, not the input
pipeline). Each measurement runs in its own child process, the two settings alternating for --rounds rounds,
so that a noisy machine shows as spread between rounds rather than as a difference between settings. Median over
timed repetitions after warm-up.

    python benchmarks/scalekd_step.py --batch 8 --rounds 3
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

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "methods", "scalekd_swin_t_r18.py")


def measure(args) -> dict:
    """One setting's step time, in this process."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()  # what `python -m kdep_jax.main` runs with
    import runpy

    import jax

    from kdep_jax import distill, methods, optim, parallel, trainer
    from kdep_jax import teacher as teacher_lib

    config = runpy.run_path(CONFIG)["get_config"]()
    config.scalekd.tpp = args.tpp == "on"
    config.teacher.forward_chunk = args.teacher_forward_chunk
    config.dtype, config.train.batch_size, config.data.image_size = args.dtype, args.batch, args.image_size
    classes = 1000
    method = methods.create(config)
    teacher = teacher_lib.Teacher(trainer.init_variables(teacher_lib.model(config, classes), args.image_size, 1), "",
                                  classes)
    mesh = parallel.make_mesh()
    tx = optim.sgd(optim.step_decay_schedule(0.1, 100, 30, 0.1, 100), 0.9, 1e-4)
    state = trainer.create_train_state(distill.initial_variables(config, method, teacher, None), tx, mesh, seed=0)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, classes), tx, mesh)
    constants = parallel.replicate((teacher.variables, None), mesh)
    rng = np.random.default_rng(0)
    batch = parallel.shard_batches([{"image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
        np.float32), "label": rng.integers(0, classes, args.batch).astype(np.int32)}], mesh, 1)
    count = parallel.replicate(np.int32(1), mesh)  # one step per call
    start = time.perf_counter()
    compiled = step.lower(state, batch, count, constants).compile()
    compile_seconds = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, count, constants)
        jax.block_until_ready(metrics["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"tpp": args.tpp, "seconds": seconds, "images_per_second": args.batch / seconds,
            "compile_seconds": compile_seconds, "times": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teacher-forward-chunk", type=int, default=None,
                        help="config.teacher.forward_chunk: at most this many images per device in each chunk of the "
                        "teacher's forward pass, 0 for the whole batch (default: the measured default)")
    parser.add_argument("--tpp", choices=["on", "off"], help=argparse.SUPPRESS)  # set in the child processes
    args = parser.parse_args()
    if args.tpp:
        print(json.dumps(measure(args)))
        return
    argv = sys.argv[1:]
    print(f"ScaleKD step, Swin-T -> ResNet-18, {args.image_size} px, batch {args.batch}, {args.dtype}, CPU")
    for round_index in range(args.rounds):
        for tpp in ("on", "off"):
            completed = subprocess.run([sys.executable, __file__, *argv, "--tpp", tpp], capture_output=True,
                                       text=True, check=False)
            if completed.returncode != 0:
                sys.exit(f"tpp {tpp} failed:\n{completed.stderr[-3000:]}")
            result = json.loads(completed.stdout.strip().splitlines()[-1])
            print(f"round {round_index + 1}  TPP {tpp:3s}  {result['images_per_second']:6.2f} images/s  "
                  f"(median step {result['seconds']:.2f} s of {', '.join(f'{t:.2f}' for t in result['times'])}; "
                  f"compiled in {result['compile_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
