"""Each CPU-dependent form of kdep_jax on and off, in one process: what decides which CPUs get it.

`kdep_jax/models/layers.py` picks some forms of its ops by the CPU's instruction set (some on every x86 CPU with AVX2
and FMA, some on AVX-512 CPUs only, as each was measured). Here each form is compiled both ways into the workloads it
was measured on (the distillation step, ResNet-50 teacher, for the students' forms; a model's eval-mode forward pass for
the teachers') and the two are timed alternately, round by round, in one process, so that the machine's drift hits both
alike. The forms compute the same values in another order, so the two results differ by float32 rounding only: that
difference is printed too. The figures, per CPU, are in benchmarks/README.md.

    python benchmarks/cpu_forms.py                          # every form, on every workload it was measured on
    python benchmarks/cpu_forms.py --form materialise_gelu --rounds 8
    python benchmarks/cpu_forms.py --form materialise_gelu --workload forward:swin_t
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from unittest import mock

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# Each form (a function `layers._<form>()` that says whether it is on) and the workloads it was measured on:
# "step:<student>", or "forward:<arch>" (in float32; "forward:<arch>:bfloat16" in bfloat16).
FORMS = {
    "pointwise_weight_gradient_as_dot": ("step:mobilenet_v2", "step:resnet18"),
    "materialise_gradients": ("step:mobilenet_v2",),
    "chunk_weight_gradient": ("step:mobilenet_v2",),
    "native_weight_gradient": ("step:mobilenet_v2",),
    "native_input_gradient": ("step:mobilenet_v2",),
    "native_conv_weight_gradient": ("step:resnet18", "step:mobilenet_v2"),
    "native_conv": ("step:resnet18", "step:mobilenet_v2"),
    "winograd_conv": ("step:resnet18", "step:mobilenet_v2", "forward:resnet50"),
    "winograd_4x4_conv": ("step:resnet18", "step:mobilenet_v2", "forward:resnet50"),
    "winograd_weight_gradient": ("step:resnet18",),
    "weight_gradient_of_activation": ("step:resnet18",),
    "native_max_pool": ("step:resnet18",),
    "relu_as_select": ("step:resnet18", "step:mobilenet_v2", "forward:resnet50"),
    "pad_wide_kernels": ("forward:convnext_tiny", "forward:efficientnet_lite0"),
    "materialise_gelu": ("forward:swin_t", "forward:convnext_tiny", "forward:vit_b_16"),
    "native_attention": ("forward:vit_b_16",),
    "native_dense": ("forward:vit_b_16",),
    "amx_conv": ("forward:resnet50:bfloat16",),
}


def step_workload(student: str, args):
    """(a function that runs one distillation step, carrying the train state from call to call; a function that
    gives that state's arrays: parameters, BatchNorm statistics and momentum, which holds the gradients; the bytes
    of XLA's temporaries)."""
    import distill_step
    import jax

    setup_args = argparse.Namespace(teacher="resnet50", student=student, dtype="float32", batch=args.step_batch,
                                    image_size=args.image_size, device="cpu", input="synthetic", steps_per_call=1,
                                    teacher_forward_chunk=None, teacher_dtype=None)
    step, state, count, constants, next_batches = distill_step.kdep_jax_setup(setup_args, cached=False)
    batches = next_batches()
    compiled = step.lower(state, batches, count, constants).compile()
    carried = [state]

    def run():
        carried[0], metrics = compiled(carried[0], batches, count, constants)
        return metrics["loss"]

    return run, lambda: jax.tree.leaves(carried[0]), compiled.memory_analysis().temp_size_in_bytes


def forward_workload(arch: str, args, dtype: str = "float32"):
    """(a function that runs one eval-mode forward pass and returns the pooled features; one that gives the
    features as a list of arrays, to compare; the bytes of XLA's temporaries)."""
    import jax

    from kdep_jax import models, trainer
    from kdep_jax.models import layers, vit

    network = models.create_model(arch, num_classes=None, dtype=jax.numpy.dtype(dtype))
    images = np.random.default_rng(0).normal(size=(args.forward_batch, args.image_size, args.image_size, 3))
    images = jax.numpy.asarray(images.astype(np.float32))
    variables = trainer.init_variables(network, args.image_size, seed=0)

    def forward(variables, images):  # as the teacher's forward pass runs (`teacher.outputs_fn`)
        if arch in vit.CONFIGS:
            variables = layers.with_packed_dense_kernels(variables)
        return network.apply(variables, images, train=False)[1]["pooled"]

    compiled = jax.jit(forward).lower(variables, images).compile()

    def run():
        return compiled(variables, images)

    return run, lambda: [run()], compiled.memory_analysis().temp_size_in_bytes


def compare(form: str, workload: str, args) -> dict:
    """Median seconds per call and XLA's temporaries with the form on and off, and how far the two variants' results
    are apart after the warm-up calls: the norm of their difference over all arrays, relative to the norm of the
    form-off result (for a step, the train state, whose momentum holds the last gradients; a per-array measure would
    blow up on the parameters whose gradient is zero but for rounding, such as BatchNorm biases that the next
    BatchNorm normalises away)."""
    import jax

    from kdep_jax.models import layers

    kind, model, *dtype = workload.split(":")
    runs = {}
    for on in (True, False):
        with mock.patch.object(layers, f"_{form}", lambda on=on: on):  # read while tracing, i.e. while compiling
            if kind == "step":
                run, arrays, temp_bytes = step_workload(model, args)
            else:
                run, arrays, temp_bytes = forward_workload(model, args, *dtype)
        for _ in range(max(args.warmup, 1)):
            jax.block_until_ready(run())
        runs[on] = (run, [np.asarray(array, np.float64) for array in arrays()], [], temp_bytes)
    for round_index in range(args.rounds):
        for on in (True, False) if round_index % 2 == 0 else (False, True):
            run, _, times, _ = runs[on]
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
    squared_difference = sum(np.sum((on - off) ** 2) for on, off in zip(runs[True][1], runs[False][1]))
    difference = np.sqrt(squared_difference / max(sum(np.sum(off ** 2) for off in runs[False][1]), 1e-30))
    return {"on": statistics.median(runs[True][2]), "off": statistics.median(runs[False][2]),
            "relative_difference": float(difference), "temp_on": runs[True][3], "temp_off": runs[False][3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--workload", help="comma-separated: time only these of the forms' workloads, e.g. "
                        "forward:swin_t (default: every workload of each form)")
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--forward-batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2,
                        help="calls of each variant before timing, at least 1 (both are compiled before these calls)")
    parser.add_argument("--rounds", type=int, default=8, help="timed calls of each variant, alternating")
    args = parser.parse_args()
    forms = args.form.split(",")
    for form in forms:
        if form not in FORMS:
            parser.error(f"unknown form {form!r}; known: {', '.join(FORMS)}")
    known_workloads = sorted({workload for form in forms for workload in FORMS[form]})
    workloads = args.workload.split(",") if args.workload else known_workloads
    for workload in workloads:
        if workload not in known_workloads:
            parser.error(f"--workload {workload!r} is not a workload of {args.form}; those are: "
                         f"{', '.join(known_workloads)}")

    os.environ["JAX_PLATFORMS"] = "cpu"  # the forms are CPU-only
    from kdep_jax import xla_flags

    xla_flags.apply_defaults()  # what `python -m kdep_jax.main` runs with; XLA_FLAGS set here win
    from distill_step import cpu_name

    print(f"{cpu_name()}; XLA_FLAGS={os.environ['XLA_FLAGS']}; median of {args.rounds} rounds, s per call")
    for form in forms:
        for workload in (workload for workload in FORMS[form] if workload in workloads):
            result = compare(form, workload, args)
            batch = args.step_batch if workload.startswith("step:") else args.forward_batch
            print(f"{form:34} {workload + f' batch {batch}':30} on {result['on']:.3f}  off {result['off']:.3f}  "
                  f"on is {result['off'] / result['on']:.2f}x  "
                  f"results differ by {result['relative_difference']:.1e} (relative norm)  XLA temporaries "
                  f"{result['temp_on'] / 2**20:.0f} / {result['temp_off'] / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
