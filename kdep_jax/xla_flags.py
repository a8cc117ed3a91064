"""XLA flags measured to make kdep_jax faster, added to XLA_FLAGS unless the user already set them.

XLA reads XLA_FLAGS once, when JAX starts its first backend: `apply_defaults()` must run before that
(`kdep_jax.main` calls it first thing). The flags depend on the CPU's instruction set, read from the
"flags" line of /proc/cpuinfo (never from a machine or model name); accelerators ignore every XLA:CPU
flag. Each entry says what the flag does; what it was measured to do, and on which CPU, is in
benchmarks/README.md. A flag that did not help on the measured hardware is not here.
"""
from __future__ import annotations

import os

_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"

# Every CPU (measured on AVX2-only AMD EPYC): hand dot products, including the 1x1 convolutions XLA
# rewrites as dots (most of ResNet-50), to YNNPACK.
DEFAULTS = {_YNN_FUSION_TYPE: "dot"}

# x86 CPUs with AVX2 and FMA, AVX-512 ones among them: reductions too (BatchNorm's batch statistics and their
# gradients), with XLA's memory-optimised scheduler. Against "dot" with XLA's default scheduler: the ResNet-18 and
# MobileNetV2 steps 1.3x and 2.4x on an Intel Xeon (AVX-512, AMX), 1.19x and 1.60x on AMD EPYC Zen 5, 1.07x and 1.52x
# on Zen 4, and 1.13x and 1.29x on an AVX2-only AMD EPYC (Zen 3; 1.07x and 1.26x on an AVX2 CPU simulated on Zen 4,
# whose YNNPACK code could not be capped at AVX2; before kdep_jax's C++ kernels "reduce" alone was level on the AVX2
# EPYC's ResNet-18 step). With "reduce", XLA's default thunk order (the concurrency-optimised scheduler) keeps many
# more buffers alive at once: the memory-optimised one takes the MobileNetV2 step's working memory from 4.5 to 1.7 GiB
# and makes it 1.2x faster (ResNet-18: 1.23 to 0.80 GiB, no slower; on the EPYC, peak RSS 4.7 to 2.0 GiB and 1.3x
# faster, ResNet-18 1.9 to 1.4 GiB and 1.07x).
AVX2_FMA_DEFAULTS = {_YNN_FUSION_TYPE: "dot,reduce", "xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def first_cpu(cpuinfo: str | None = None) -> dict[str, str]:
    """The fields of the first CPU in `cpuinfo` (the text of /proc/cpuinfo; read when None): "vendor_id", "cpu
    family", "model", "flags", ... Empty where there is no /proc/cpuinfo (not Linux)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return {}
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of the first CPU in `cpuinfo` (the text of /proc/cpuinfo; read when None).

    Empty when there is no /proc/cpuinfo (not Linux) or it has no flags line (not x86): generic defaults.
    """
    return frozenset(first_cpu(cpuinfo).get("flags", "").split())


def avx2_fma(cpuinfo: str | None = None) -> bool:
    """Whether the CPU is an x86 one with AVX2 and FMA (every AVX-512 CPU has both): the CPUs kdep_jax's C++
    kernels, its measured XLA flags and most of its CPU forms are for."""
    return {"avx2", "fma"} <= cpu_features(cpuinfo)


def amx_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has AMX tiles for bfloat16 (an Intel Xeon since Sapphire Rapids): where kdep_jax's AMX conv
    kernel can run a bfloat16 teacher's convs (`cpu_kernels.amx_runs_here`)."""
    return {"amx_tile", "amx_bf16"} <= cpu_features(cpuinfo)


def defaults(cpuinfo: str | None = None) -> dict[str, str]:
    """The default flags for the CPU described by `cpuinfo` (this machine's /proc/cpuinfo when None)."""
    return dict(AVX2_FMA_DEFAULTS if avx2_fma(cpuinfo) else DEFAULTS)


def apply_defaults(environ=os.environ, cpuinfo: str | None = None) -> None:
    """Adds each default flag to XLA_FLAGS in `environ`, unless a value for it is already there."""
    flags = environ.get("XLA_FLAGS", "").split()
    for name, value in defaults(cpuinfo).items():
        if not any(flag.split("=")[0] == f"--{name}" for flag in flags):
            flags.append(f"--{name}={value}")
    environ["XLA_FLAGS"] = " ".join(flags)
