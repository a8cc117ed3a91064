"""XLA flags measured to make kdep_jax faster, added to XLA_FLAGS unless the user already set them.

XLA reads XLA_FLAGS once, when JAX starts its first backend: `apply_defaults()` must run before that
(`kdep_jax.main` calls it first thing). Each entry says what it was measured to do; a flag that did not
help on the measured hardware is not here.
"""
from __future__ import annotations

import os

# XLA:CPU: hand dot products (including the 1x1 convolutions XLA rewrites as dots, most of ResNet-50) to
# YNNPACK. Distillation step ResNet-50 -> ResNet-18, 224 px, batch 16, float32, 2-core AMD EPYC (AVX2):
# 7.1-7.4 s without, 3.3-3.6 s with (`python benchmarks/distill_step.py --framework kdep_jax --batch 16`,
# and XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-dot to switch it off). Adding its "eltwise" fusion,
# or splitting the CPU into 2 devices, was slower; adding "reduce" changed nothing. Accelerators ignore it.
DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}


def apply_defaults(environ=os.environ) -> None:
    """Adds each default flag to XLA_FLAGS in `environ`, unless a value for it is already there."""
    flags = environ.get("XLA_FLAGS", "").split()
    for name, value in DEFAULTS.items():
        if not any(flag.split("=")[0] == f"--{name}" for flag in flags):
            flags.append(f"--{name}={value}")
    environ["XLA_FLAGS"] = " ".join(flags)
