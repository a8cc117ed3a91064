"""kdep_jax's own XLA:CPU kernels (cpu_kernels.cc), compiled for this CPU on first use.

Convolutions that XLA:CPU runs below the CPU's speed: a dense conv's forward pass (and a stride-1 conv's input
gradient) and weight gradient, which XLA hands to Eigen (a stem's as a contraction only 3 channels long); a
depthwise conv's weight gradient, which XLA runs as k*k passes over the batch, each copying a shifted window of the
input out of memory, and its input gradient (k*k shifted products added in fused loops); and a max-pool's input
gradient, which XLA runs as a chain of selects over strided windows. And one that is not a convolution: multi-head
attention's softmax(q k^T / sqrt(d)) v, which XLA runs as two batched products around a softmax, with the heads split
out of the tokens and merged back by copies; and a Linear layer's product, which XLA runs through YNNPACK.
The C++ kernels keep their sums in registers over many pixels and channels (1.1-8x faster alone on AMD EPYCs, Zen 4
and Zen 5; benchmarks/README.md); a 3x3 conv with stride 1 can run by Winograd's F(2x2, 3x3), with 2.25x fewer
products (1.5-2.0x faster alone than the direct kernel), or F(4x4, 3x3), with 4x fewer (another 1.5x at 56 and 28
px).
They run on x86 CPUs with AVX-512, or with AVX2 and FMA, each with a register blocking of its own (`runs_here`).
They are built with the machine's C++ compiler (`$CXX`, else g++; `-march=native`, vectors moved whole) into a
cache directory (`$KDEP_JAX_KERNEL_CACHE`, else `~/.cache/kdep_jax/kernels`), under a name that hashes the source,
the compiler, jaxlib's version and the CPU's flags, so a rebuilt jaxlib or another CPU gets a build of its own.
Where they cannot be built kdep_jax warns once and keeps XLA's forms: the same gradients, slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from kdep_jax import compilation_cache, xla_flags

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_DEPTHWISE_WEIGHT_GRADIENT = "kdep_depthwise_weight_gradient"
_CONV_WEIGHT_GRADIENT = "kdep_conv_weight_gradient"
_CONV = "kdep_conv"
_CONV_INPUT_GRADIENT = "kdep_conv_input_gradient"
_MAX_POOL = "kdep_max_pool"
_MAX_POOL_GRADIENT = "kdep_max_pool_gradient"
_BATCH_MOMENTS = {jnp.dtype(jnp.float32): "kdep_batch_moments", jnp.dtype(jnp.bfloat16): "kdep_batch_moments_bf16"}
_DEPTHWISE_INPUT_GRADIENT = "kdep_depthwise_input_gradient"
_WINOGRAD_CONV = {2: "kdep_winograd_conv", 4: "kdep_winograd_conv_4x4"}  # by output tile
_WINOGRAD_WEIGHT_GRADIENT = "kdep_winograd_weight_gradient"
_WINOGRAD_WEIGHT_GRADIENT_OF_ACTIVATION = "kdep_winograd_weight_gradient_of_activation"
_ATTENTION = "kdep_attention"
_DENSE = "kdep_dense"
_AMX_CONV = "kdep_amx_conv"
_AMX_CONV_OF_ACTIVATION = "kdep_amx_conv_of_activation"
_AMX_CONV_TO_BLOCK_END = "kdep_amx_conv_of_activation_to_block_end"
_AMX_CONV_WEIGHT_GRADIENT = "kdep_amx_conv_weight_gradient"
_AMX_PATCH_CONV = "kdep_amx_patch_conv"
_AMX_PATCH_CONV_WEIGHT_GRADIENT = "kdep_amx_patch_conv_weight_gradient"
_AMX_PATCH_CONV_MAX_POOL = "kdep_amx_patch_conv_max_pool"
_AMX_PATCH_CONV_POOL_STATISTICS = "kdep_amx_patch_conv_pool_statistics"
_AMX_PATCH_CONV_POOL_WEIGHT_GRADIENT = "kdep_amx_patch_conv_pool_weight_gradient"
CONV_OUT_BLOCK = 32  # `conv`'s output channels come in blocks of this many (kConvOutBlock)


def cache_dir() -> Path:
    if os.environ.get("KDEP_JAX_KERNEL_CACHE"):
        return Path(os.environ["KDEP_JAX_KERNEL_CACHE"])
    return compilation_cache.user_cache_dir() / "kernels"


# GCC 12 and newer, tuned for some Intel CPUs, copy 64 bytes (one of the kernels' vectors, read and written with
# memcpy) in two 32-byte moves (-mmove-max=256: on an Intel Xeon with AMX that GCC's -march=native takes for a
# Rocket Lake this made the ResNet-18 step 2.4x slower). AMD's and GCC's generic tunings already move them whole,
# so there these flags change nothing; a compiler without them (clang, older GCC) builds without them.
_WHOLE_VECTOR_MOVES = ("-mmove-max=512", "-mstore-max=512")


def _accepted(compiler: str, flags: tuple[str, ...]) -> list[str]:
    """`flags` if `compiler` knows them, else none."""
    probe = subprocess.run([compiler, *flags, "-x", "c++", "-E", "-o", os.devnull, os.devnull], capture_output=True)
    return list(flags) if probe.returncode == 0 else []


def build(directory: Path | None = None) -> Path:
    """The shared library of cpu_kernels.cc for this CPU, compiled into `directory` (`cache_dir()`) unless a
    build for the same source, compiler, jaxlib and CPU is there. Written under a temporary name and renamed,
    so that processes building at once (test workers) never load a half-written file.

    Raises OSError (no compiler) or subprocess.CalledProcessError (the compiler failed, its output attached).
    """
    directory = Path(directory or cache_dir())
    compiler = os.environ.get("CXX", "g++")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    command = [compiler, "-O3", "-march=native", *_accepted(compiler, _WHOLE_VECTOR_MOVES), "-std=c++17", "-shared",
               "-fPIC", "-w", "-I", jax.ffi.include_dir(), str(SOURCE)]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(command[:-2]), version, jaxlib.__version__,
                                    " ".join(sorted(xla_flags.cpu_features()))]).encode()).hexdigest()[:16]
    library = directory / f"cpu_kernels_{key}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".so.tmp", delete=False) as partial:
            partial_path = Path(partial.name)
        try:
            subprocess.run([*command, "-o", str(partial_path)], capture_output=True, text=True, check=True,
                           timeout=300)
            os.replace(partial_path, library)
        finally:
            partial_path.unlink(missing_ok=True)
    return library


@functools.cache
def available() -> bool:
    """Builds (or finds) the kernels and registers them with XLA:CPU; False, with one warning saying why and what
    to do, where that fails."""
    try:
        library = ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        warnings.warn(
            f"kdep_jax could not build its CPU kernels for convolutions ({SOURCE.name}, "
            f"with {os.environ.get('CXX', 'g++')}): {detail.strip()[-500:]}\nIt uses XLA's forms instead: the "
            "same results, more slowly (convolutions, MobileNetV2's depthwise convs' gradients). To get "
            "the kernels, install a C++ compiler (e.g. `apt install g++`) or point $CXX at one.", RuntimeWarning,
            stacklevel=2)
        return False
    for name, handler in [(_DEPTHWISE_WEIGHT_GRADIENT, library.KdepDepthwiseWeightGradient),
                          (_CONV_WEIGHT_GRADIENT, library.KdepConvWeightGradient), (_CONV, library.KdepConv),
                          (_CONV_INPUT_GRADIENT, library.KdepConvInputGradient),
                          (_MAX_POOL, library.KdepMaxPool), (_MAX_POOL_GRADIENT, library.KdepMaxPoolGradient),
                          (_BATCH_MOMENTS[jnp.dtype(jnp.float32)], library.KdepBatchMoments),
                          (_BATCH_MOMENTS[jnp.dtype(jnp.bfloat16)], library.KdepBatchMomentsBfloat16),
                          (_DEPTHWISE_INPUT_GRADIENT, library.KdepDepthwiseInputGradient),
                          (_WINOGRAD_CONV[2], library.KdepWinogradConv),
                          (_WINOGRAD_CONV[4], library.KdepWinogradConv4x4),
                          (_WINOGRAD_WEIGHT_GRADIENT, library.KdepWinogradWeightGradient),
                          (_WINOGRAD_WEIGHT_GRADIENT_OF_ACTIVATION, library.KdepWinogradWeightGradientOfActivation),
                          (_ATTENTION, library.KdepAttention), (_DENSE, library.KdepDense),
                          (_AMX_CONV, library.KdepAmxConv),
                          (_AMX_CONV_OF_ACTIVATION, library.KdepAmxConvOfActivation),
                          (_AMX_CONV_TO_BLOCK_END, library.KdepAmxConvOfActivationToBlockEnd),
                          (_AMX_CONV_WEIGHT_GRADIENT, library.KdepAmxConvWeightGradient),
                          (_AMX_PATCH_CONV, library.KdepAmxPatchConv),
                          (_AMX_PATCH_CONV_WEIGHT_GRADIENT, library.KdepAmxPatchConvWeightGradient),
                          (_AMX_PATCH_CONV_MAX_POOL, library.KdepAmxPatchConvMaxPool),
                          (_AMX_PATCH_CONV_POOL_STATISTICS, library.KdepAmxPatchConvPoolStatistics),
                          (_AMX_PATCH_CONV_POOL_WEIGHT_GRADIENT, library.KdepAmxPatchConvPoolWeightGradient)]:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    return True


@functools.cache
def runs_here() -> bool:
    """Whether the kernels run on this CPU: one with AVX-512, or with AVX2 and FMA, for which cpu_kernels.cc keeps
    fewer sums in registers (AVX2 simulated on the `AMD EPYC` Zen 4, family 25 model 17: the ResNet-18 step 1.41x and
    the MobileNetV2 step 2.61x faster with the kernels than with XLA's forms; benchmarks/README.md), where they can
    be built (`available`)."""
    return xla_flags.avx2_fma() and available()


def _require_kernels() -> None:
    if not available():
        raise RuntimeError(f"kdep_jax's CPU kernels could not be built (see the warning above); {SOURCE} is needed")


def _call(target: str, out_shape: tuple[int, ...], a: jax.Array, b: jax.Array, stride: int, padding,
          **attributes: int) -> jax.Array:
    """One device's batch: under a sharded jit, XLA would gather the batch for a kernel first."""
    _require_kernels()
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")
    a, b = (v if v.dtype == jnp.int8 else v.astype(jnp.float32) for v in (a, b))  # int8: the max-pool's taps
    return call(a, b, stride=np.int64(stride),
                pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]),
                **{name: np.int64(value) for name, value in attributes.items()})


def depthwise_input_gradient(grad: jax.Array, kernel: jax.Array, input_shape: tuple[int, ...], stride: int,
                             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of a k x k depthwise conv's input, of shape input_shape (N, H, W, C), from its output gradient
    `grad` (N, Ho, Wo, C) and HWIO kernel (k, k, 1, C), in float32; padding as in `layers.depthwise_conv`."""
    return _call(_DEPTHWISE_INPUT_GRADIENT, tuple(input_shape), grad, kernel, stride, padding)


def depthwise_weight_gradient(x: jax.Array, grad: jax.Array, kernel_size: int, stride: int,
                              padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of a k x k depthwise conv's HWIO kernel (k, k, 1, C), in float32, from its NHWC input x and
    output gradient `grad`; padding ((top, bottom), (left, right)) as in `layers.depthwise_conv`."""
    return _call(_DEPTHWISE_WEIGHT_GRADIENT, (kernel_size, kernel_size, 1, x.shape[-1]), x, grad, stride, padding)


def conv_weight_gradient(x: jax.Array, grad: jax.Array, kernel_size: int, stride: int,
                         padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of a k x k dense conv's HWIO kernel (k, k, Cin, Cout), in float32, from its NHWC input x and
    output gradient `grad`."""
    return _call(_CONV_WEIGHT_GRADIENT, (kernel_size, kernel_size, x.shape[-1], grad.shape[-1]), x, grad, stride,
                 padding)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """A dense conv in float32: NHWC x, HWIO kernel (k, k, Cin, Cout) with Cout a multiple of CONV_OUT_BLOCK, zero
    padding ((top, bottom), (left, right)); the output is (N, Ho, Wo, Cout) as for `jax.lax.conv_general_dilated`."""
    k = kernel.shape[0]
    out_size = [(size + before + after - k) // stride + 1 for size, (before, after) in zip(x.shape[1:3], padding)]
    return _call(_CONV, (x.shape[0], *out_size, kernel.shape[-1]), x, kernel, stride, padding)


def winograd_conv(x: jax.Array, kernel: jax.Array, tile: int = 2) -> jax.Array:
    """A dense 3x3 conv with stride 1 and padding 1 by Winograd's F(tile x tile, 3x3), tile 2 or 4, in float32: NHWC
    x with Cin a multiple of 16, HWIO kernel (3, 3, Cin, Cout) with Cout a multiple of CONV_OUT_BLOCK; the output is
    x's size. 2.25x (tile 2) or 4x (tile 4) fewer products than `conv`; the sums differ from it by float32 rounding,
    a few times more for tile 4 (larger coefficients in its transforms)."""
    return _call(_WINOGRAD_CONV[tile], (*x.shape[:3], kernel.shape[-1]), x, kernel, 1, ((1, 1), (1, 1)))


def winograd_weight_gradient(x: jax.Array, grad: jax.Array,
                             activation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """The gradient of `winograd_conv`'s kernel (3, 3, Cin, Cout), in float32, from its input x and output gradient
    `grad` (channels multiples of 16), by the same F(2x2, 3x3) algorithm: 2.25x fewer products than
    `conv_weight_gradient`; the sums differ from it by float32 rounding. activation (scale, shift), per channel: the
    conv's input is relu(x * scale + shift) (`layers.relu`), computed here from x."""
    shape, padding = (3, 3, x.shape[-1], grad.shape[-1]), ((1, 1), (1, 1))
    if activation is None:
        return _call(_WINOGRAD_WEIGHT_GRADIENT, shape, x, grad, 1, padding)
    _require_kernels()
    call = jax.ffi.ffi_call(_WINOGRAD_WEIGHT_GRADIENT_OF_ACTIVATION, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(*(v.astype(jnp.float32) for v in (x, *activation, grad)), stride=np.int64(1),
                pad_top=np.int64(1), pad_left=np.int64(1))


def conv_input_gradient(grad: jax.Array, kernel: jax.Array, input_shape: tuple[int, ...], stride: int,
                        padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of `conv`'s input, of shape input_shape (N, H, W, Cin) with Cin a multiple of CONV_OUT_BLOCK,
    from its output gradient `grad` (N, Ho, Wo, Cout), in float32."""
    return _call(_CONV_INPUT_GRADIENT, tuple(input_shape), grad, kernel, stride, padding)


def max_pool(x: jax.Array, kernel_size: int, stride: int,
             padding: tuple[tuple[int, int], tuple[int, int]]) -> tuple[jax.Array, jax.Array]:
    """A k x k max-pool of the NHWC x padded with -inf (`layers.max_pool`), in float32, and for each output the int8
    number of the first tap, in row-major order, that holds its maximum (k * k where none does: a NaN maximum)."""
    _require_kernels()
    (top, bottom), (left, right) = padding
    batch, height, width, channels = x.shape
    out_shape = (batch, (height + top + bottom - kernel_size) // stride + 1,
                 (width + left + right - kernel_size) // stride + 1, channels)
    call = jax.ffi.ffi_call(_MAX_POOL, (jax.ShapeDtypeStruct(out_shape, jnp.float32),
                                        jax.ShapeDtypeStruct(out_shape, jnp.int8)), vmap_method="sequential")
    return call(x.astype(jnp.float32), kernel_size=np.int64(kernel_size), stride=np.int64(stride),
                pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def max_pool_gradient(taps: jax.Array, grad: jax.Array, input_shape: tuple[int, ...], kernel_size: int, stride: int,
                      padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The input gradient, of shape input_shape (N, H, W, C), of a k x k max-pool (`layers.max_pool`) in float32, from
    its output gradient `grad` and, for each output, the int8 number of the tap that holds the maximum (row-major;
    one in the padding, or from k * k up, takes nothing)."""
    return _call(_MAX_POOL_GRADIENT, tuple(input_shape), taps, grad, stride, padding, kernel_size=kernel_size)


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each channel's mean and biased variance over the (N, H, W) of the NHWC x (float32 or bfloat16), in float32,
    from float64 sums in an order the shape fixes (`layers.BatchNorm` in training)."""
    _require_kernels()
    moments = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    return jax.ffi.ffi_call(_BATCH_MOMENTS[x.dtype], (moments, moments), vmap_method="sequential")(x)


ATTENTION_HEAD_DIM_MULTIPLE = 64  # `attention`'s head_dim: a multiple of this (kAttentionVectors x 16 lanes)


def attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v per head, in float32: from a fused q/k/v projection's output qkv (N, T, 3C),
    each token's q, k and v side by side and the heads side by side within each, to (N, T, C) with the heads side by
    side; C / num_heads a multiple of ATTENTION_HEAD_DIM_MULTIPLE."""
    _require_kernels()
    n, tokens, width = qkv.shape
    head_dim = width // 3 // num_heads
    call = jax.ffi.ffi_call(_ATTENTION, jax.ShapeDtypeStruct((n, tokens, width // 3), jnp.float32),
                            vmap_method="sequential")
    return call(qkv.astype(jnp.float32), heads=np.int64(num_heads), scale=np.float32(head_dim**-0.5))


DENSE_OUT_BLOCK = 32  # `dense`'s output features come in blocks of this many (kVectorOutBlock)


def pack_dense_weights(kernel: jax.Array) -> jax.Array:
    """A Linear layer's kernel (K, N), N a multiple of DENSE_OUT_BLOCK, in the order `dense` reads it: (N / 32, K, 32),
    each block of 32 output features' weights K rows long."""
    depth, features = kernel.shape
    return kernel.astype(jnp.float32).reshape(depth, features // DENSE_OUT_BLOCK, DENSE_OUT_BLOCK).transpose(1, 0, 2)


def dense(x: jax.Array, packed_kernel: jax.Array) -> jax.Array:
    """x (M, K) times a kernel (K, N) packed by `pack_dense_weights`, in float32: (M, N)."""
    _require_kernels()
    blocks, _, block = packed_kernel.shape
    call = jax.ffi.ffi_call(_DENSE, jax.ShapeDtypeStruct((x.shape[0], blocks * block), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), packed_kernel)


AMX_CONV_CHANNELS = 32  # `amx_conv`'s input and output channels: multiples of this


@functools.cache
def amx_runs_here() -> bool:
    """Whether `amx_conv` runs on this CPU: one with AMX tiles for bfloat16 (an Intel Xeon since Sapphire Rapids),
    where the kernels run (`runs_here`) and were built with the AMX instructions (a compiler that knows them: GCC 11
    or newer, clang 12)."""
    return xla_flags.amx_bf16() and runs_here() and bool(ctypes.CDLL(str(build())).KdepHasAmx())


def amx_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]],
             activation: tuple[jax.Array, jax.Array] | None = None,
             block_end: tuple[jax.Array, jax.Array, jax.Array, bool] | None = None,
             residual_map: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """A dense conv in bfloat16 on the AMX tiles: NHWC x and HWIO kernel (k, k, Cin, Cout) rounded to bfloat16, Cin
    and Cout multiples of AMX_CONV_CHANNELS, zero padding ((top, bottom), (left, right)); the output (N, Ho, Wo, Cout)
    as for `jax.lax.conv_general_dilated`, its float32 sums rounded to bfloat16. activation (scale, shift), per
    channel: the conv's input is relu(x * scale + shift) (`layers.relu`), computed in float32 and rounded to
    bfloat16 here. block_end (scale, shift, residual, relu), with an activation: the output is sums * scale + shift
    + residual (the output's shape), relu'd where relu, rounded once; residual_map (scale, shift), per channel: the
    residual is bfloat16(residual * scale + shift) instead (a BatchNorm's output)."""
    _require_kernels()
    k = kernel.shape[0]
    out_size = [(size + before + after - k) // stride + 1 for size, (before, after) in zip(x.shape[1:3], padding)]
    out = jax.ShapeDtypeStruct((x.shape[0], *out_size, kernel.shape[-1]), jnp.bfloat16)
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    attributes = dict(stride=np.int64(stride), pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))
    if activation is None:
        return jax.ffi.ffi_call(_AMX_CONV, out, vmap_method="sequential")(x, kernel, **attributes)
    scale, shift = (v.astype(jnp.float32) for v in activation)
    if block_end is None:
        call = jax.ffi.ffi_call(_AMX_CONV_OF_ACTIVATION, out, vmap_method="sequential")
        return call(x, scale, shift, kernel, **attributes)
    end_scale, end_shift, residual, relu = block_end
    none = jnp.zeros((0,), jnp.float32)  # no map
    residual_scale, residual_shift = (v.astype(jnp.float32) for v in residual_map or (none, none))
    call = jax.ffi.ffi_call(_AMX_CONV_TO_BLOCK_END, out, vmap_method="sequential")
    return call(x, scale, shift, kernel, end_scale.astype(jnp.float32), end_shift.astype(jnp.float32),
                residual.astype(jnp.bfloat16), residual_scale, residual_shift, relu=np.int64(relu), **attributes)


def amx_conv_weight_gradient(x: jax.Array, grad: jax.Array, kernel_size: int, stride: int,
                             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The weight gradient (k, k, Cin, Cout) of `amx_conv`, in float32, from its input x and output gradient grad,
    both rounded to bfloat16 (Cin and Cout multiples of AMX_CONV_CHANNELS): each chunk of images' sums in float32 on
    the AMX tiles, the chunks' added in float64, in order."""
    _require_kernels()
    shape = (kernel_size, kernel_size, x.shape[-1], grad.shape[-1])
    call = jax.ffi.ffi_call(_AMX_CONV_WEIGHT_GRADIENT, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.bfloat16), grad.astype(jnp.bfloat16), stride=np.int64(stride),
                pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def _amx_patch_call(target: str, out, operands: tuple[jax.Array, ...], stride: int, padding,
                    max_pool: tuple[int, int, int] | None = None):
    """The patch kernels' call: the conv's stride and top and left padding, and where max_pool (k, stride, pad) the
    pool's."""
    _require_kernels()
    attributes = dict(stride=stride, pad_top=padding[0][0], pad_left=padding[1][0])
    if max_pool is not None:
        attributes.update(pool_size=max_pool[0], pool_stride=max_pool[1], pool_pad=max_pool[2])
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(*operands, **{name: np.int64(value) for name, value in attributes.items()})


def _strided_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _pooled_shape(x: jax.Array, kernel: jax.Array, stride: int, padding,
                  max_pool: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of the conv's sums max-pooled; the conv padded the same on both sides."""
    if any(before != after for before, after in padding):
        raise ValueError(f"kdep_jax's AMX kernels pool the sums of a conv padded the same on both sides, not {padding}")
    pool_size, pool_stride, pool_pad = max_pool
    out_size = [_strided_size(_strided_size(size, kernel.shape[0], stride, pad), pool_size, pool_stride, pool_pad)
                for size, (pad, _) in zip(x.shape[1:3], padding)]
    return (x.shape[0], *out_size, kernel.shape[-1])


def _bfloat16(*values: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(value.astype(jnp.bfloat16) for value in values)


def amx_patch_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], tuple[int, int]],
                   max_pool: tuple[int, int, int] | None = None) -> jax.Array:
    """A dense conv whose input channels need not come in blocks of AMX_CONV_CHANNELS (a stem's, on the RGB image) on
    the AMX tiles: x and the HWIO kernel (k, k, Cin, Cout) rounded to bfloat16, Cout a multiple of
    AMX_CONV_CHANNELS; each row of an output's patch (k taps' Cin values along a row of x) copied side by side,
    zeros up to a multiple of 32, times the kernel's row. The output (N, Ho, Wo, Cout) as for
    `jax.lax.conv_general_dilated`, its float32 sums as they are (`conv`'s in bfloat16). max_pool (k, stride, pad),
    with padding the same on both sides: the sums' max-pool instead (`max_pool`'s values), the sums never written
    out; not to be differentiated."""
    if max_pool is None:
        out_size = [_strided_size(size, kernel.shape[0], stride, pad) for size, (pad, _) in zip(x.shape[1:3], padding)]
        out = jax.ShapeDtypeStruct((x.shape[0], *out_size, kernel.shape[-1]), jnp.float32)
        return _amx_patch_call(_AMX_PATCH_CONV, out, _bfloat16(x, kernel), stride, padding)
    out = jax.ShapeDtypeStruct(_pooled_shape(x, kernel, stride, padding, max_pool), jnp.float32)
    return _amx_patch_call(_AMX_PATCH_CONV_MAX_POOL, out, _bfloat16(x, kernel), stride, padding, max_pool)


def amx_patch_conv_pool_statistics(x: jax.Array, kernel: jax.Array, stride: int, padding,
                                   max_pool: tuple[int, int, int]) -> tuple[jax.Array, ...]:
    """`amx_patch_conv(..., max_pool=)` in training: the pooled sums, each pooled output's int8 tap (`max_pool`'s),
    and the sums' batch mean and variance (`batch_moments`', bit for bit), the sums never written out."""
    shape = _pooled_shape(x, kernel, stride, padding, max_pool)
    moments = jax.ShapeDtypeStruct(shape[-1:], jnp.float32)
    out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int8), moments, moments)
    return _amx_patch_call(_AMX_PATCH_CONV_POOL_STATISTICS, out, _bfloat16(x, kernel), stride, padding, max_pool)


def amx_patch_conv_pool_weight_gradient(x: jax.Array, kernel: jax.Array, taps: jax.Array, grad_pooled: jax.Array,
                                        slope: jax.Array, offset: jax.Array, stride: int, padding,
                                        max_pool: tuple[int, int, int]) -> jax.Array:
    """The kernel's gradient, in float32, through `amx_patch_conv_pool_statistics`: the gradient of the conv's sums is
    that of the pooled outputs at their taps plus offset + slope * sums per channel (the batch statistics'),
    rounded to bfloat16, the sums computed again; then as `amx_patch_conv_weight_gradient`."""
    operands = (*_bfloat16(x, kernel), taps, *(v.astype(jnp.float32) for v in (grad_pooled, slope, offset)))
    out = jax.ShapeDtypeStruct(kernel.shape, jnp.float32)
    return _amx_patch_call(_AMX_PATCH_CONV_POOL_WEIGHT_GRADIENT, out, operands, stride, padding, max_pool)


def amx_patch_conv_weight_gradient(x: jax.Array, grad: jax.Array, kernel_size: int, stride: int,
                                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The weight gradient (k, k, Cin, Cout) of `amx_patch_conv`, in float32, from its input x and output gradient
    grad, both rounded to bfloat16: the patch rows transposed times grad on the AMX tiles, each band of an image's
    output rows in float32, added in float64 image by image, in order."""
    out = jax.ShapeDtypeStruct((kernel_size, kernel_size, x.shape[-1], grad.shape[-1]), jnp.float32)
    return _amx_patch_call(_AMX_PATCH_CONV_WEIGHT_GRADIENT, out, _bfloat16(x, grad), stride, padding)
