"""Building blocks shared by the backbones, written to match torch.nn numerically.

Flax's defaults differ from torch in ways that change results: "SAME" padding pads a stride-2 3x3 conv
(0, 1) where torch pads (1, 1), and flax.linen.BatchNorm updates its running variance with the biased
batch variance where torch uses the unbiased one. The pieces here follow torch. Models ported from
TensorFlow (EfficientNet-Lite) keep TensorFlow's "SAME" padding: the convs take `tf_same_padding`.
"""
import functools
import math
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from kdep_jax import xla_flags
from kdep_jax.models import cpu_kernels

Dtype = Any

# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu"), a plain (not truncated)
# normal. Flax computes fan_out of an HWIO kernel as kh * kw * O, as torch does for OIHW, depthwise included.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis: the output has ceil(size / stride) pixels, and an odd total
    puts the extra pixel after (a stride-2 3x3 conv on an even size pads (0, 1)). Flax's "SAME" is the same rule.
    """
    out_size = -(-size // stride)
    total = max((out_size - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


def conv2d(features: int, kernel_size: int, stride: int = 1, dtype: Dtype = jnp.float32,
           name: str | None = None, tf_same_padding: bool = False) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding kernel_size // 2 (torchvision's convs all use it), or
    with TensorFlow's "SAME" padding when tf_same_padding."""
    pad = kernel_size // 2
    padding = "SAME" if tf_same_padding else ((pad, pad), (pad, pad))
    hook = None
    if jax.default_backend() == "cpu":
        if kernel_size == 1:
            hook = _flax_pointwise_conv
        else:  # TensorFlow's padding keeps XLA's forms (the C++ kernels are tested with torch's)
            hook = functools.partial(_flax_conv, kernels=not tf_same_padding)
    elif jax.default_backend() == "gpu" and dtype == jnp.bfloat16:
        hook = channel_padded_conv
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                   use_bias=False, kernel_init=conv_kernel_init, dtype=dtype,
                   param_dtype=jnp.float32, name=name, conv_general_dilated=hook)


def channel_padded_conv(lhs, rhs, window_strides, padding, **conv_options):
    """nn.Conv's convolution hook for conv2d's bfloat16 convs on a GPU: an input of fewer than 8 channels (a stem's
    RGB image) and the kernel zero-padded to 8 channels, what cuDNN's bfloat16 tensor-core kernels read. cuDNN
    otherwise pads the input itself in each call. The zeros add exact zeros; the kernel's gradient is the padded
    one's first channels. The R50 -> R18 step on an H200 in bfloat16, batch 256: 10801 against 10512 images/s
    (1.03x) and 3.08 against 3.35 GiB of peak memory (benchmarks/README.md)."""
    missing = 8 - lhs.shape[-1]
    if missing > 0 and conv_options.get("feature_group_count", 1) == 1:
        lhs = jnp.pad(lhs, ((0, 0), (0, 0), (0, 0), (0, missing)))
        rhs = jnp.pad(rhs, ((0, 0), (0, 0), (0, missing), (0, 0)))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **conv_options)


@functools.cache
def _pointwise_weight_gradient_as_dot() -> bool:
    """Whether conv2d's 1x1 convs take their weight gradient as a dot product (`pointwise_conv`): measured
    faster on an AVX-512 Intel Xeon, level on AVX-512 AMD EPYCs (Zen 5, Zen 4), the ResNet-18 and MobileNetV2 steps
    1.04-1.05x on an AVX2 CPU simulated on Zen 4 (benchmarks/README.md)."""
    return xla_flags.avx2_fma()


def _pointwise_conv_forward(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    if _on_amx_tiles(x, kernel):
        return cpu_kernels.amx_conv(x, kernel, stride, ((0, 0), (0, 0)))
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.cache
def _amx_conv() -> bool:
    """Whether conv2d's bfloat16 convs take their forward pass from kdep_jax's AMX kernel (`cpu_kernels.amx_conv`)
    where it runs: XLA:CPU does not use the AMX tiles, and runs bfloat16 convs 1.55x slower than float32 ones. A
    bfloat16 ResNet-50's forward pass at batch 32 went from 0.72x to 1.9x the float32 one's speed (Intel Xeon,
    benchmarks/README.md). There their gradients come from the tiles too (the input gradient, the weight gradient,
    `_conv_forms`) or else from the float32 kernels, of the bfloat16 values, their float32 sums rounded once, where
    XLA's bfloat16 gradient convs round more and ran slower: the ResNet-18 step in bfloat16 1.89 s with XLA's
    gradients, 1.44 with the float32 kernels', 1.36-1.40 with the input gradient at stride 1 on the tiles, 1.17 with
    the weight gradient too (Intel Xeon, benchmarks/README.md); the strided convs' input gradients, of the gradient
    with zeros between its pixels, 2x faster on the tiles than by the float32 kernel for all the zeros (ResNet-18's
    three: 59-64 -> 26-31 ms at batch 32; the step 0.902 -> 0.890 s). A conv whose input channels do not fit the
    tiles' blocks (a stem's RGB image) runs on them by its patches, its float32 sums as the float32 kernel gives them
    (`cpu_kernels.amx_patch_conv`): the two ResNet stems' forward passes and the student's weight gradient 35, 34 and
    34 ms -> 19, 17 and 14 in the R50 -> R18 step at batch 32, the step 0.94 -> 0.86 s."""
    return cpu_kernels.amx_runs_here()


def _on_amx_tiles(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether a bfloat16 conv's forward pass runs as `cpu_kernels.amx_conv`: on one device (under a sharded jit XLA
    would gather the batch for it), its channels in blocks of the kernel's; x in bfloat16, or in float32 (rounded
    for the kernel)."""
    return (kernel.dtype == jnp.bfloat16 and x.dtype in (jnp.bfloat16, jnp.float32) and jax.device_count() == 1
            and _amx_conv() and x.shape[-1] % cpu_kernels.AMX_CONV_CHANNELS == 0
            and kernel.shape[-1] % cpu_kernels.AMX_CONV_CHANNELS == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int, weight_gradient_as_dot: bool) -> jax.Array:
    """A 1x1 conv (kernel (1, 1, C, O)) on CPU whose input gradient (at stride 1) is a dot product of the output
    gradient and the transposed kernel, and whose weight gradient, where weight_gradient_as_dot, is one dot
    product over the (N * H * W, C) input and output gradient.

    XLA's own input gradient is a convolution with the kernel's channels swapped, which XLA:CPU makes a dot alone
    but not in the body of the trainer's loop of steps, where Eigen runs it at 10-80 GFLOP/s for MobileNetV2's thin
    convs (0.28 s of the 0.97 s of its step's kernels, Zen 5); written as a dot it goes to YNNPACK (or Eigen's
    matrix product), as it did before the loop. A strided conv's input gradient stays XLA's (as a dot placed back
    by an interior pad it was no faster in ResNet-18's step; it is `conv_input_gradient`). XLA's own weight gradient
    is a convolution with an H x W window (`conv_weight_gradient`), which XLA:CPU runs through Eigen after
    transposing both operands (and recomputing the input's BatchNorm and activation inside the transpose); a dot
    contracting the leading axis of both goes to YNNPACK without them: 1.1-7x faster alone (MobileNetV2's and
    ResNet's shapes, benchmarks/README.md). The forward pass is XLA's, already a dot.
    """
    return _pointwise_conv_forward(x, kernel, stride)


def _pointwise_conv_vjp_forward(x, kernel, stride, weight_gradient_as_dot):
    return _pointwise_conv_forward(x, kernel, stride), (x, kernel)


def _pointwise_conv_vjp_backward(stride, weight_gradient_as_dot, residuals, grad):
    x, kernel = residuals
    no_padding = ((0, 0), (0, 0))
    if stride == 1:
        grad_x = jax.lax.dot_general(grad, kernel[0, 0], (((3,), (1,)), ((), ())))
    else:
        grad_x = conv_input_gradient(grad, kernel, x.shape, stride, no_padding)
    if not weight_gradient_as_dot:
        return grad_x, conv_weight_gradient(x, grad, kernel.shape, stride, no_padding)
    seen = x[:, ::stride, ::stride, :]  # the pixels a strided 1x1 conv reads
    grad_kernel = jax.lax.dot_general(seen.reshape(-1, seen.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                                      (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_vjp_forward, _pointwise_conv_vjp_backward)


def _flax_pointwise_conv(lhs, rhs, window_strides, padding, **conv_options):
    """nn.Conv's convolution hook for conv2d's 1x1 convs: those have no padding, dilation or groups, and
    NHWC / HWIO layouts, so only the stride is passed on."""
    return pointwise_conv(lhs, rhs, window_strides[0], _pointwise_weight_gradient_as_dot())


_XLA_FORMS = ("xla", "xla", "xla")


def _flax_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, feature_group_count=1,
               *, kernels: bool = True, **conv_options):
    """nn.Conv's convolution hook for k x k convs on CPU (`native_conv`): NHWC / HWIO layouts, square strides, no
    dilation or groups. With kernels (conv2d's convs with torch's padding), on one device, in float32, where
    kdep_jax's C++ kernels are on: the forward pass and the input gradient from its conv kernels (where the channels
    they write come in blocks of 32; a 3x3 conv with stride 1 by Winograd's F(2x2, 3x3), or F(4x4, 3x3) on images of
    at least _WINOGRAD_4X4_MIN_SIZE pixels a side, where its channels come in blocks of 16 too), the weight gradient
    from its weight-gradient kernels (Winograd's F(2x2, 3x3) too, on images of at least
    _WINOGRAD_WEIGHT_GRADIENT_MIN_SIZE pixels a side). In bfloat16 on a CPU with AMX tiles, the forward pass from
    the AMX kernel (`_on_amx_tiles`; a stem's, of 3 input channels, by its patches: `cpu_kernels.amx_patch_conv`),
    and so the weight gradient and the input gradient (`_amx_conv`). The rest is XLA's."""
    if feature_group_count != 1 or any(d not in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        raise ValueError("kdep_jax's CPU conv hook takes convs without groups or dilation")
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple(tuple(pair) for pair in padding)
    forms = _conv_forms(lhs, rhs, window_strides[0], padding) if kernels else _XLA_FORMS
    return native_conv(lhs, rhs, window_strides[0], padding, forms)


def cpu_conv_hook():
    """`conv_general_dilated` for an nn.Conv outside conv2d (patch embeddings, TensorFlow's padding, heads): on CPU
    XLA's convolutions with their gradients in the layout XLA:CPU runs well inside the trainer's loop of steps
    (`conv_weight_gradient`); None, lax's own, on accelerators."""
    return functools.partial(_flax_conv, kernels=False) if jax.default_backend() == "cpu" else None


def _conv_forms(lhs: jax.Array, rhs: jax.Array, stride: int, padding) -> tuple[str, str, str]:
    """Where conv2d's conv on CPU takes its forward pass, input gradient and weight gradient (`native_conv`)."""
    k, _, in_channels, out_channels = rhs.shape
    # in bfloat16 where the AMX kernel runs: the tiles where they fit (below), else the float32 kernels' forms, of the
    # same bfloat16 values
    bfloat16_on_amx = rhs.dtype == jnp.bfloat16 and jax.device_count() == 1 and _amx_conv()
    one_device_float32 = (lhs.dtype == rhs.dtype == jnp.float32 and jax.device_count() == 1) or bfloat16_on_amx
    native = one_device_float32 and _native_conv()
    winograd_shape = k == 3 and stride == 1 and padding == ((1, 1), (1, 1))
    winograd = native and _winograd_conv() and winograd_shape

    def form(written: int, read: int) -> str:
        if not native or written % cpu_kernels.CONV_OUT_BLOCK:
            return "xla"
        if not (winograd and read % 16 == 0):
            return "direct"
        by_4x4_tiles = _winograd_4x4_conv() and min(lhs.shape[1:3]) >= _WINOGRAD_4X4_MIN_SIZE
        return "winograd_4x4" if by_4x4_tiles else "winograd"

    weight_gradient = "xla"
    if one_device_float32 and _native_conv_weight_gradient():
        by_winograd = (_winograd_weight_gradient() and winograd_shape and in_channels % 16 == 0
                       and out_channels % 16 == 0 and min(lhs.shape[1:3]) >= _WINOGRAD_WEIGHT_GRADIENT_MIN_SIZE)
        weight_gradient = "winograd" if by_winograd else "direct"
    forward, input_gradient = form(out_channels, in_channels), form(in_channels, out_channels)
    if bfloat16_on_amx:  # on the tiles; a stem's (3 input channels) by its patches, its input gradient as before
        on_tiles = _on_amx_tiles(lhs, rhs)
        by_patches = not on_tiles and out_channels % cpu_kernels.AMX_CONV_CHANNELS == 0
        forward = "amx" if on_tiles else "amx_patches" if by_patches else "xla" if forward == "xla" else "direct"
        input_gradient = "amx" if on_tiles else input_gradient
        weight_gradient = "amx" if on_tiles else "amx_patches" if by_patches else weight_gradient
    return forward, input_gradient, weight_gradient


@functools.cache
def _native_conv() -> bool:
    """Whether conv2d's convs take their forward pass and input gradient from kdep_jax's C++ kernels
    (`cpu_kernels.conv`, `cpu_kernels.conv_input_gradient`): alone 1.1-1.3x faster than XLA's Eigen convolutions at
    a ResNet's 56 to 14 px (level at 7 px), 1.2x for the stems, 1.4-5x for the strided convs' input gradients; the
    ResNet-18 step 1.13x, the MobileNetV2 step 1.06x (its stem only; AMD EPYC Zen 5, benchmarks/README.md).
    Where the kernels run (`cpu_kernels.runs_here`); elsewhere XLA's."""
    return cpu_kernels.runs_here()


@functools.cache
def _winograd_conv() -> bool:
    """Whether conv2d's 3x3 convs with stride 1 take their forward pass and input gradient from the Winograd
    F(2x2, 3x3) kernel (`cpu_kernels.winograd_conv`) rather than the direct one, where `_native_conv` is on: 2.25x
    fewer products, alone 1.5-2.0x faster at a ResNet's 56 to 7 px; the ResNet-18 step 1.20x, the MobileNetV2 step
    (its teacher's convs) 1.12x on TCMalloc (AMD EPYC Zen 5, benchmarks/README.md). The sums differ from the direct
    kernel's by float32 rounding (tests/test_models.py checks both against float64)."""
    return _native_conv()


# The smallest image whose 3x3 convs take their forward pass and input gradient by Winograd's F(4x4, 3x3)
# (`_winograd_4x4_conv`): alone 1.5x faster than F(2x2, 3x3) at a ResNet's 56 and 28 px, level at 14 px (4x4 tiles
# over 14 px compute 16), 0.6x at 7 px, where each image has only 4 tiles (AMD EPYC Zen 5).
_WINOGRAD_4X4_MIN_SIZE = 28


@functools.cache
def _winograd_4x4_conv() -> bool:
    """Whether the Winograd convs on images of at least _WINOGRAD_4X4_MIN_SIZE pixels a side take F(4x4, 3x3) (4x
    fewer products than the direct conv; `cpu_kernels.winograd_conv(..., tile=4)`) rather than F(2x2, 3x3) (2.25x),
    where `_winograd_conv` is on: the ResNet-18 step 1.05x, ResNet-50's forward pass 1.03x (AMD EPYC Zen 5,
    benchmarks/README.md). Its transforms have larger coefficients: one conv's sums are 4e-6 to 1e-5 of the largest
    output from float64 where F(2x2, 3x3)'s are 2-9e-7 (tests/test_models.py), but ResNet-50's features stay 1.6-2.0e-6
    from torch's float64 ones, as torch's float32 ones are (1.4-1.9e-6)."""
    return _winograd_conv()


# The smallest image whose 3x3 convs take their weight gradient by Winograd (`_winograd_weight_gradient`): alone
# 1.2-1.5x faster than the direct kernel at a ResNet's 56 to 14 px, 0.85x at 7 px, where a tile of 2x2 pixels
# wastes a quarter of its products on padding and each image has few tiles (AMD EPYC Zen 5).
_WINOGRAD_WEIGHT_GRADIENT_MIN_SIZE = 14


@functools.cache
def _winograd_weight_gradient() -> bool:
    """Whether conv2d's 3x3 convs with stride 1 take their weight gradient from the Winograd F(2x2, 3x3) kernel
    (`cpu_kernels.winograd_weight_gradient`) where `_native_conv_weight_gradient` is on, on images of at least
    _WINOGRAD_WEIGHT_GRADIENT_MIN_SIZE pixels a side (benchmarks/README.md)."""
    return _native_conv_weight_gradient()


@functools.cache
def _native_conv_weight_gradient() -> bool:
    """Whether conv2d's convs take their weight gradient from kdep_jax's C++ kernel (`cpu_kernels`): alone 1.5-2.9x
    XLA's (Eigen's) speed at a ResNet's 56 and 28 px and its stem, 8x at MobileNetV2's stem, level at 14 and 7 px;
    the ResNet-18 step 1.13x against XLA's weight gradients for every conv (AMD EPYC Zen 5, benchmarks/README.md).
    Where the kernels run (`cpu_kernels.runs_here`); elsewhere XLA's."""
    return cpu_kernels.runs_here()


def _dense_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


_WINOGRAD_TILES = {"winograd": 2, "winograd_4x4": 4}  # the conv forms by Winograd's F(m x m, 3x3), and m


def _conv_by_form(x: jax.Array, kernel: jax.Array, stride: int, padding, form: str) -> jax.Array:
    if form in _WINOGRAD_TILES:
        return cpu_kernels.winograd_conv(x, kernel, _WINOGRAD_TILES[form])
    if form == "direct":  # float32 sums, in bfloat16 too
        return cpu_kernels.conv(x, kernel, stride, padding)
    if form == "amx":
        return cpu_kernels.amx_conv(x, kernel, stride, padding)
    if form == "amx_patches":  # float32 sums
        return cpu_kernels.amx_patch_conv(x, kernel, stride, padding)
    return _dense_conv(x, kernel, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def native_conv(x: jax.Array, kernel: jax.Array, stride: int, padding, forms: tuple[str, str, str]) -> jax.Array:
    """A dense conv (NHWC, HWIO; padding ((top, bottom), (left, right))) on CPU whose forward pass, input gradient
    and weight gradient each come from XLA's convolution or kdep_jax's C++ kernels (one device), as forms says (for
    each, "xla", "direct", "winograd" or "winograd_4x4"; the weight gradient's not "winograd_4x4"; each "amx" too,
    in bfloat16). XLA's gradients are
    `conv_input_gradient` and `conv_weight_gradient`."""
    return _conv_by_form(x, kernel, stride, padding, forms[0])


def _native_conv_vjp_forward(x, kernel, stride, padding, forms):
    return _conv_by_form(x, kernel, stride, padding, forms[0]), (x, kernel)


def _turned_round(kernel: jax.Array) -> jax.Array:
    """The kernel (HWIO) of the conv that gives a stride-1 conv's input gradient: flipped, input and output
    channels swapped."""
    return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def conv_input_gradient(grad: jax.Array, kernel: jax.Array, input_shape: tuple[int, ...], stride: int,
                        padding) -> jax.Array:
    """The input gradient of `_dense_conv` (what jax.vjp gives) as XLA's convolution in NHWC / HWIO, the layout
    XLA:CPU hands to Eigen: a conv of grad, dilated by the stride, with the kernel turned round. JAX's own has the
    kernel as HWOI, which XLA:CPU transposes into that layout outside a loop but not in the body of the trainer's
    loop of steps, where it ran 2-5x slower (benchmarks/README.md, stop 45)."""
    pads = [(k - 1 - low, k - 1 - high + (size + low + high - k) % stride)
            for (low, high), size, k in zip(padding, input_shape[1:3], kernel.shape[:2])]
    return jax.lax.conv_general_dilated(grad, _turned_round(kernel), (1, 1), pads, lhs_dilation=(stride, stride),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_weight_gradient(x: jax.Array, grad: jax.Array, kernel_shape: tuple[int, ...], stride: int,
                         padding) -> jax.Array:
    """The weight gradient of `_dense_conv` (HWIO, what jax.vjp gives) as XLA's convolution in NHWC / HWIO, the
    layout XLA:CPU hands to Eigen: x's channels as the batch and its images as the features, over a window of grad's
    pixels dilated by the stride. JAX's own (dim_labels f01b_i01o->01bf) XLA:CPU transposes into that layout outside
    a loop; in the body of the trainer's loop of steps it ran XLA's plain loops, 25-90x slower (benchmarks/README.md,
    stop 45)."""
    kh, kw = kernel_shape[:2]
    sums = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), (1, 1), padding,
                                        rhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return sums[:, :kh, :kw, :].transpose(1, 2, 0, 3)  # past kh, kw: the rows the strided windows never reach


def _input_gradient(grad: jax.Array, kernel: jax.Array, x: jax.Array, stride: int, padding, form: str) -> jax.Array:
    if form in _WINOGRAD_TILES:  # stride 1, padding 1: a conv of grad with the kernel turned round
        return cpu_kernels.winograd_conv(grad, _turned_round(kernel), _WINOGRAD_TILES[form])
    if form == "amx":  # the same, in bfloat16 on the tiles, of grad dilated by the stride (zeros in between)
        k = kernel.shape[0]
        pads = tuple((k - 1 - low, k - 1 - high + (size + low + high - k) % stride)
                     for (low, high), size in zip(padding, x.shape[1:3]))
        zero = jnp.zeros((), grad.dtype)
        dilated = jax.lax.pad(grad, zero, ((0, 0, 0), (0, 0, stride - 1), (0, 0, stride - 1), (0, 0, 0)))
        return cpu_kernels.amx_conv(dilated, _turned_round(kernel), 1, pads)
    if form == "direct":
        return cpu_kernels.conv_input_gradient(grad, kernel, x.shape, stride, padding)
    return conv_input_gradient(grad, kernel, x.shape, stride, padding)


def _native_conv_vjp_backward(stride, padding, forms, residuals, grad):
    x, kernel = residuals
    grad = grad.astype(kernel.dtype)  # a bfloat16 stem's forward pass gives the float32 kernel's sums
    _, input_gradient, weight_gradient = forms
    grad_x = _input_gradient(grad, kernel, x, stride, padding, input_gradient)
    if weight_gradient == "winograd":
        grad_kernel = cpu_kernels.winograd_weight_gradient(x, grad)
    elif weight_gradient == "direct":
        grad_kernel = cpu_kernels.conv_weight_gradient(x, grad, kernel.shape[0], stride, padding)
    elif weight_gradient == "amx":
        grad_kernel = cpu_kernels.amx_conv_weight_gradient(x, grad, kernel.shape[0], stride, padding)
    elif weight_gradient == "amx_patches":
        grad_kernel = cpu_kernels.amx_patch_conv_weight_gradient(x, grad, kernel.shape[0], stride, padding)
    else:
        grad_kernel = conv_weight_gradient(x, grad, kernel.shape, stride, padding)
    return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)


native_conv.defvjp(_native_conv_vjp_forward, _native_conv_vjp_backward)


class ConvOfActivation(nn.Module):
    """conv2d's conv (its "kernel" parameter, torch's padding) of relu(x * scale + shift), a BatchNorm's affine map
    per channel (`BatchNorm(..., affine=True)`) and a ReLU.

    Where the conv's weight gradient is Winograd's (`_conv_forms`), its kernel computes the activation from x itself
    (`conv_of_activation`): the backward pass keeps x, which the BatchNorm keeps anyway, and not the activation too
    (ResNet-18's step: XLA's temporaries 578 -> 487 MiB at batch 32; benchmarks/README.md).

    block_end (scale, shift, residual, relu), a ResNet block's last conv in eval mode: the output is its BatchNorm's
    affine map of the conv, plus the residual, relu'd where relu; residual_map (scale, shift): the residual through
    a BatchNorm's map first (the downsampling shortcut's). In bfloat16 on the AMX tiles the kernel computes it as it
    writes the conv's sums (`amx_conv_to_block_end`).
    """
    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, scale: jax.Array, shift: jax.Array,
                 block_end: tuple[jax.Array, jax.Array, jax.Array, bool] | None = None,
                 residual_map: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        k, pad = self.kernel_size, self.kernel_size // 2
        kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        kernel, padding = kernel.astype(self.dtype), ((pad, pad), (pad, pad))
        on_amx_tiles = jax.default_backend() == "cpu" and _on_amx_tiles(x, kernel)
        if block_end is not None and on_amx_tiles and block_end[2].dtype == jnp.bfloat16:
            *end, apply_relu = block_end
            return amx_conv_to_block_end(x, scale, shift, kernel, *end, residual_map, apply_relu, self.stride,
                                         padding)
        if block_end is not None and residual_map is not None:
            end_scale, end_shift, residual, apply_relu = block_end
            block_end = (end_scale, end_shift, _mapped(residual, *residual_map, self.dtype), apply_relu)
        if jax.default_backend() != "cpu":
            y = _dense_conv(_activation(x, scale, shift, self.dtype), kernel, self.stride, padding)
        elif on_amx_tiles:
            y = amx_conv_of_activation(x, scale, shift, kernel, self.stride, padding)
        else:
            forms = _conv_forms(x, kernel, self.stride, padding)
            if forms[2] == "winograd" and _weight_gradient_of_activation():
                y = conv_of_activation(x, scale, shift, kernel, padding, forms)
            else:
                hook = _flax_pointwise_conv if k == 1 else _flax_conv
                y = hook(_activation(x, scale, shift, self.dtype), kernel, (self.stride, self.stride), padding,
                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if block_end is None else _block_end(y, *block_end, self.dtype)


class PooledConv(nn.Module):
    """conv2d's conv (its "kernel" parameter, torch's padding), each output channel times its sign (+1 or -1), then a
    max-pool of its float32 sums (pool: (k, stride, pad)), in bfloat16 on the AMX tiles by one kernel that never
    writes the sums out (`cpu_kernels.amx_patch_conv`; where `pools_before_activation`: a ResNet's stem). In eval
    mode the pooled sums; in training with the sums' batch mean and variance and their count
    (`pooled_conv_statistics`). ResNet-50's stem conv and pool at batch 32 alone 12 ms, against 22 by two kernels on
    TCMalloc and 53 on glibc's malloc, whose fresh pages for the sums cost the rest; in the R50 -> R18 step in
    bfloat16 (profiled) the teacher's 29 ms -> 12, the student's forward and backward passes 90 -> 64 ms, the step
    0.82 -> 0.79 s and the memory it faults in per call 541 -> 429 MiB (Intel Xeon, benchmarks/README.md)."""
    features: int
    kernel_size: int
    stride: int
    pool: tuple[int, int, int]
    dtype: Dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array, signs: jax.Array, train: bool):
        k, pad = self.kernel_size, self.kernel_size // 2
        kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        kernel, padding = kernel.astype(self.dtype) * signs.astype(self.dtype), ((pad, pad), (pad, pad))
        if not train:
            return cpu_kernels.amx_patch_conv(x, kernel, self.stride, padding, self.pool)
        pooled, mean, var = pooled_conv_statistics(x, kernel, self.stride, padding, self.pool)
        return pooled, mean, var, _conv_outputs(x, k, self.stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def pooled_conv_statistics(x: jax.Array, kernel: jax.Array, stride: int, padding,
                           pool: tuple[int, int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The max-pool (pool: (k, stride, pad)) of a bfloat16 conv's float32 sums and the sums' batch mean and
    variance, by one AMX kernel (`cpu_kernels.amx_patch_conv_pool_statistics`): the values of `_pooled_statistics`
    bit for bit, the sums never written out; their gradient (its kernel's) from the pooled outputs' and statistics'
    gradients, the sums computed again (the sums' gradient rounded to bfloat16, as the conv's is)."""
    return _pooled_conv_statistics_forward(x, kernel, stride, padding, pool)[0]


def _conv_outputs(x: jax.Array, k: int, stride: int, padding) -> int:
    """How many outputs a k x k conv of x gives per channel."""
    return x.shape[0] * math.prod(_output_size(size, k, stride, pads) for size, pads in zip(x.shape[1:3], padding))


def _pooled_statistics(x, kernel, stride, padding, pool):
    """`pooled_conv_statistics` by the conv, pool and batch-moments kernels, their gradients by their own."""
    forms = ("amx_patches", _conv_forms(x, kernel, stride, padding)[1], "amx_patches")
    sums = native_conv(x, kernel, stride, padding, forms)
    return (_shifted_max_pool(sums, pool[0], pool[1], pool[2], sums.shape), *batch_moments(sums))


def _pooled_conv_statistics_forward(x, kernel, stride, padding, pool):
    pooled, taps, mean, var = cpu_kernels.amx_patch_conv_pool_statistics(x, kernel, stride, padding, pool)
    return (pooled, mean, var), (x, kernel, taps, mean)


def _pooled_conv_statistics_backward(stride, padding, pool, residuals, grads):
    x, kernel, taps, mean = residuals
    grad_pooled, grad_mean, grad_var = grads
    count = _conv_outputs(x, kernel.shape[0], stride, padding)
    slope = 2.0 * grad_var / count  # batch_moments' gradient: (grad_mean + 2 (sums - mean) grad_var) / count
    offset = grad_mean / count - slope * mean
    grad_kernel = cpu_kernels.amx_patch_conv_pool_weight_gradient(x, kernel, taps, grad_pooled, slope, offset, stride,
                                                                  padding, pool)
    # x's gradient (none for an image, which XLA then drops) by the unfused kernels
    _, vjp = jax.vjp(lambda x: _pooled_statistics(x, kernel, stride, padding, pool), x)
    return vjp(grads)[0], grad_kernel.astype(kernel.dtype)


pooled_conv_statistics.defvjp(_pooled_conv_statistics_forward, _pooled_conv_statistics_backward)


def _mapped(x: jax.Array, scale: jax.Array, shift: jax.Array, dtype: Dtype) -> jax.Array:
    """A BatchNorm's output from its map (`BatchNorm(..., affine=True)`), as BatchNorm computes it."""
    return (x.astype(jnp.float32) * scale + shift).astype(dtype)


def _block_end(y: jax.Array, scale: jax.Array, shift: jax.Array, residual: jax.Array, apply_relu: bool,
               dtype: Dtype) -> jax.Array:
    """A ResNet block's end in eval mode: its last BatchNorm's map (as `BatchNorm` computes it), the residual and,
    where apply_relu, the ReLU."""
    out = _mapped(y, scale, shift, dtype) + residual
    return relu(out) if apply_relu else out


@functools.cache
def _weight_gradient_of_activation() -> bool:
    """Whether ConvOfActivation's Winograd weight gradient computes the activation from x (`conv_of_activation`)
    rather than the backward pass keeping it: ResNet-18's step XLA temporaries 578 -> 487 MiB, its time level
    (0.97-1.02x; AMD EPYC Zen 5, benchmarks/README.md). Wherever the Winograd weight gradient runs."""
    return _winograd_weight_gradient()


def _activation(x: jax.Array, scale: jax.Array, shift: jax.Array, dtype: Dtype) -> jax.Array:
    """What BatchNorm then relu give: the affine map in float32, the ReLU in the model's dtype."""
    return relu((x.astype(jnp.float32) * scale + shift).astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def conv_of_activation(x: jax.Array, scale: jax.Array, shift: jax.Array, kernel: jax.Array, padding,
                       forms: tuple[str, str, str]) -> jax.Array:
    """native_conv(relu(x * scale + shift), kernel) in float32 on one CPU device, whose weight gradient is Winograd's
    (forms[2]); its backward pass keeps x, not the activation, which the weight-gradient kernel computes again."""
    return _conv_by_form(_activation(x, scale, shift, jnp.float32), kernel, 1, padding, forms[0])


def _conv_of_activation_forward(x, scale, shift, kernel, padding, forms):
    return conv_of_activation(x, scale, shift, kernel, padding, forms), (x, scale, shift, kernel)


def _conv_of_activation_backward(padding, forms, residuals, grad):
    x, scale, shift, kernel = residuals
    grad_activation = _input_gradient(grad, kernel, x, 1, padding, forms[1])
    grad_affine = jnp.where(x * scale + shift > 0, grad_activation, jnp.zeros_like(grad_activation))  # relu's
    axes = tuple(range(x.ndim - 1))
    return (grad_affine * scale, jnp.sum(grad_affine * x, axes), jnp.sum(grad_affine, axes),
            cpu_kernels.winograd_weight_gradient(x, grad, (scale, shift)))


conv_of_activation.defvjp(_conv_of_activation_forward, _conv_of_activation_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def amx_conv_of_activation(x: jax.Array, scale: jax.Array, shift: jax.Array, kernel: jax.Array, stride: int,
                           padding) -> jax.Array:
    """conv(relu(x * scale + shift) in bfloat16, kernel) on the AMX tiles (`_on_amx_tiles`), the activation computed
    as the kernel reads x, where XLA would write it out and read it back (rounding to bfloat16 slowly, about 1 ns a
    value on 2 cores); the gradients: the activation's XLA's, the conv's `_conv_forms`'s."""
    return cpu_kernels.amx_conv(x, kernel, stride, padding, (scale, shift))


def _amx_conv_of_activation_forward(x, scale, shift, kernel, stride, padding):
    return amx_conv_of_activation(x, scale, shift, kernel, stride, padding), (x, scale, shift, kernel)


def _conv_of_bfloat16_activation(x, scale, shift, kernel, stride, padding) -> jax.Array:
    """What the AMX kernels compute, for their gradients: the activation's by XLA, the conv's by `_conv_forms`."""
    activation = _activation(x, scale, shift, kernel.dtype)
    return native_conv(activation, kernel, stride, padding, _conv_forms(activation, kernel, stride, padding))


def _amx_conv_of_activation_backward(stride, padding, residuals, grad):
    _, vjp = jax.vjp(functools.partial(_conv_of_bfloat16_activation, stride=stride, padding=padding), *residuals)
    return vjp(grad.astype(residuals[3].dtype))


amx_conv_of_activation.defvjp(_amx_conv_of_activation_forward, _amx_conv_of_activation_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def amx_conv_to_block_end(x: jax.Array, scale: jax.Array, shift: jax.Array, kernel: jax.Array, end_scale: jax.Array,
                          end_shift: jax.Array, residual: jax.Array, residual_map: tuple[jax.Array, jax.Array] | None,
                          apply_relu: bool, stride: int, padding) -> jax.Array:
    """`amx_conv_of_activation` then `_block_end` (the residual through residual_map first, where given), in
    bfloat16, as one AMX kernel: the end's map, residual and ReLU applied to the conv's float32 sums as the kernel
    writes them, where XLA's loops after the conv took a quarter of a bfloat16 ResNet-50's forward pass; and the
    downsampling shortcut's BatchNorm as the kernel reads the residual, where XLA's passes over it took 14-24 ms of
    that pass at batch 32 (profiled; the pass 0.334 -> 0.316 s, the R50 -> R18 step in bfloat16 0.916 -> 0.887 s;
    Intel Xeon, benchmarks/README.md). The gradients through the same ops (`_conv_of_bfloat16_activation`)."""
    block_end = (end_scale, end_shift, residual, apply_relu)
    return cpu_kernels.amx_conv(x, kernel, stride, padding, (scale, shift), block_end, residual_map)


def _amx_conv_to_block_end_forward(x, scale, shift, kernel, end_scale, end_shift, residual, residual_map, apply_relu,
                                   stride, padding):
    residuals = (x, scale, shift, kernel, end_scale, end_shift, residual, residual_map)
    return amx_conv_to_block_end(*residuals, apply_relu, stride, padding), residuals


def _amx_conv_to_block_end_backward(apply_relu, stride, padding, residuals, grad):
    def unfused(x, scale, shift, kernel, end_scale, end_shift, residual, residual_map):
        y = _conv_of_bfloat16_activation(x, scale, shift, kernel, stride, padding)
        if residual_map is not None:
            residual = _mapped(residual, *residual_map, kernel.dtype)
        return _block_end(y, end_scale, end_shift, residual, apply_relu, kernel.dtype)

    _, vjp = jax.vjp(unfused, *residuals)
    return vjp(grad)


amx_conv_to_block_end.defvjp(_amx_conv_to_block_end_forward, _amx_conv_to_block_end_backward)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, shifted_sum: bool,
                   padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> jax.Array:
    """A depthwise conv; kernel is HWIO (k, k, 1, C). padding: ((top, bottom), (left, right)); None is torch's
    kernel_size // 2 on every side.

    shifted_sum: the same conv as a sum of k*k shifted per-channel products, accumulated in float32, which
    XLA:CPU runs far faster than its grouped convolution (benchmarks/README.md). Accelerators keep the
    convolution, which cuDNN and the TPU compiler implement well.
    """
    k = kernel.shape[0]
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    if not shifted_sum:
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=kernel.shape[-1])
    # kdep_jax's kernels see one device's batch: a batch split over several CPU devices keeps XLA's forms.
    one_device = jax.device_count() == 1
    native_input_gradient = one_device and x.dtype == kernel.dtype == jnp.float32 and _native_input_gradient()
    forms = (_materialise_gradients(), _chunk_weight_gradient(), one_device and _native_weight_gradient(),
             native_input_gradient)
    return _shifted_sum(x, kernel, stride, padding, forms)


@functools.cache
def _materialise_gradients() -> bool:
    """Whether the shifted sum's backward pass reads and writes its gradients through buffers of their own
    (`_materialised`): measured 1.17x on the MobileNetV2 step on an AVX-512 Intel Xeon, level (1.00-1.03x) on
    AVX-512 AMD EPYCs (Zen 5, Zen 4) and on an AVX2 CPU simulated on Zen 4 (1.02x; benchmarks/README.md)."""
    return xla_flags.avx2_fma()


@functools.cache
def _chunk_weight_gradient() -> bool:
    """Whether the shifted sum's weight gradient is summed over chunks of images in a loop
    (`_weight_gradient_in_chunks`): the MobileNetV2 step 1.03-1.05x on an AVX-512 AMD EPYC (Zen 4), level on Zen 5
    (0.98-1.00x); on an AVX-512 Intel Xeon an earlier form (contiguous chunks of 2 images) was 1.4-1.7x faster
    alone and 1.02-1.08x on the step. AVX2-only CPUs keep the one-pass form until it is measured there
    (benchmarks/README.md)."""
    return "avx512f" in xla_flags.cpu_features()


@functools.cache
def _native_weight_gradient() -> bool:
    """Whether the shifted sum's weight gradient is kdep_jax's C++ kernel (`cpu_kernels`) rather than XLA's forms:
    3-5x faster alone than the chunked form, the MobileNetV2 step 1.08x on an AVX-512 AMD EPYC (Zen 4), 1.02x on
    Zen 5. Where the kernels run (`cpu_kernels.runs_here`); elsewhere XLA's forms."""
    return cpu_kernels.runs_here()


@functools.cache
def _native_input_gradient() -> bool:
    """Whether the shifted sum's input gradient is kdep_jax's C++ kernel (`cpu_kernels`) rather than XLA's fused
    loops: MobileNetV2's 17 alone 58 -> 37 ms at batch 32 (PyTorch channels_last 44-46), its step 1.06-1.07x on
    TCMalloc and 1.00x on glibc's malloc (AMD EPYC Zen 5, benchmarks/README.md). A kernel for the forward pass
    was not kept: XLA then keeps each depthwise output for the backward pass instead of recomputing it in the
    loops that read it (0.5 GiB more temporaries, no faster). Where the kernels run (`cpu_kernels.runs_here`);
    elsewhere XLA's forms."""
    return cpu_kernels.runs_here()


@functools.cache
def _pad_wide_kernels() -> bool:
    """Whether depthwise kernels from 5x5 up pad their input once in the forward pass (`_shifted_sum_value`):
    measured on AVX-512 Intel Xeon and AMD EPYC CPUs, and on an AVX2 CPU simulated on Zen 4 (ConvNeXt-T's and
    EfficientNet-Lite0's forward passes 1.5x; benchmarks/README.md)."""
    return xla_flags.avx2_fma()


def _output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def _tap_slices(x: jax.Array, k: int, stride: int, padding):
    """(dy, dx, the strided slice of x that tap (dy, dx) of a k x k window sees, the lax.pad config that puts
    it, or any elementwise function of it, in its place in the (N, out_h, out_w, C) output), row-major; taps
    that only ever see padding are left out.

    Padding x first gives the same windows, but XLA copies the padded x out in full before the loop that
    reads it; a lax.pad per tap it fuses into that loop: 2-8x faster depthwise forward passes and max-pools
    (benchmarks/README.md).
    """
    batch, height, width, channels = x.shape
    out_size = [_output_size(size, k, stride, pad) for size, pad in zip((height, width), padding)]
    for dy in range(k):
        for dx in range(k):
            # Output row i sees input row i * stride + dy - top: the rows first..last are inside x (columns alike).
            bounds = []
            for offset, size, out_len, (before, _) in zip((dy, dx), (height, width), out_size, padding):
                first = max(0, -(-(before - offset) // stride))
                last = min(out_len - 1, (size - 1 + before - offset) // stride)
                bounds.append((first, last, first * stride + offset - before, out_len))
            if any(first > last for first, last, _, _ in bounds):
                continue
            window = jax.lax.slice(x, (0, *(start for _, _, start, _ in bounds), 0),
                                   (batch, *(start + stride * (last - first) + 1 for first, last, start, _ in bounds),
                                    channels), (1, stride, stride, 1))
            placement = ((0, 0, 0), *((first, out_len - 1 - last, 0) for first, last, _, out_len in bounds), (0, 0, 0))
            yield dy, dx, window, placement


def _shifted_sum_unpadded(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The forward pass: each tap's product padded into place (`_tap_slices`), one fused loop over x."""
    k, channels = kernel.shape[0], kernel.shape[-1]
    out_size = [_output_size(size, k, stride, pad) for size, pad in zip(x.shape[1:3], padding)]
    zero = jnp.zeros((), jnp.float32)
    out = jnp.zeros((x.shape[0], *out_size, channels), jnp.float32)
    for dy, dx, window, placement in _tap_slices(x.astype(jnp.float32), k, stride, padding):
        out = out + jax.lax.pad(window * kernel[dy, dx, 0].astype(jnp.float32), zero, placement)
    return out.astype(x.dtype)


def _shifted_sum_padded(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The same sum over strided slices of the zero-padded x: its autodiff is the backward pass, whose weight
    gradient is 1.3-2x faster this way than the autodiff of the unpadded form (benchmarks/README.md)."""
    k, channels = kernel.shape[0], kernel.shape[-1]
    (top, bottom), (left, right) = padding
    out_size = [_output_size(size, k, stride, pad) for size, pad in zip(x.shape[1:3], padding)]
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(jnp.float32)
    out = jnp.zeros((x.shape[0], *out_size, channels), jnp.float32)
    for dy, dx, window in _strided_windows(padded, k, stride, out_size):
        out = out + window * kernel[dy, dx, 0].astype(jnp.float32)
    return out.astype(x.dtype)


def _shifted_sum_value(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    """The forward pass. A 3x3 kernel's taps are padded into place one by one (`_shifted_sum_unpadded`). From 5x5
    up the input is padded once instead (`_shifted_sum_padded`), on x86 CPUs with AVX2 and FMA: the per-tap pads'
    bounds checks grow with the k*k taps, and the padded form is 1.4-4x faster alone at 5x5 and 7x7
    (EfficientNet-Lite, ConvNeXt), where at 3x3 it is 1.5-3.7x slower (benchmarks/README.md). Its output then gets
    a buffer of its own, so that XLA does not fold the sum into the YNNPACK dot that follows (ConvNeXt's LayerNorm
    and Linear).
    """
    if kernel.shape[0] >= 5 and _pad_wide_kernels():
        return _materialised(_shifted_sum_padded(x, kernel, stride, padding), kernel)
    return _shifted_sum_unpadded(x, kernel, stride, padding)


def _shifted_sum_forward(x, kernel, stride, padding, forms):
    return _shifted_sum_value(x, kernel, stride, padding), (x, kernel)


def _shifted_sum_backward(stride, padding, forms, residuals, grad):
    """The autodiff of `_shifted_sum_padded`. forms: (`_materialise_gradients()`, `_chunk_weight_gradient()`,
    `_native_weight_gradient()` on one device, `_native_input_gradient()` on one device in float32)."""
    x, kernel = residuals
    materialise, chunk_weight_gradient, native_weight_gradient, native_input_gradient = forms
    # For XLA's k*k reads of the gradient; the kernel reads it once.
    materialise = materialise and not native_input_gradient
    if materialise:
        grad = _materialised(grad, kernel)
    if native_input_gradient:
        grad_x = cpu_kernels.depthwise_input_gradient(grad, kernel, x.shape, stride, padding)
    else:
        grad_x = jax.vjp(lambda x: _shifted_sum_padded(x, kernel, stride, padding), x)[1](grad)[0]
    if native_weight_gradient:
        grad_kernel = cpu_kernels.depthwise_weight_gradient(x, grad, kernel.shape[0], stride, padding)
        grad_kernel = grad_kernel.astype(kernel.dtype)
    elif chunk_weight_gradient and x.shape[0] % _IMAGES_PER_CHUNK == 0 and x.shape[0] > _IMAGES_PER_CHUNK:
        grad_kernel = _weight_gradient_in_chunks(x, kernel, grad, stride, padding)
    else:
        grad_kernel = _weight_gradient(x, kernel, grad, stride, padding)
    if materialise:
        grad_x = _materialised(grad_x, kernel)
    return grad_x, grad_kernel


def _weight_gradient(x: jax.Array, kernel: jax.Array, grad: jax.Array, stride: int, padding) -> jax.Array:
    return jax.vjp(lambda kernel: _shifted_sum_padded(x, kernel, stride, padding), kernel)[1](grad)[0]


_IMAGES_PER_CHUNK = 4


def _weight_gradient_in_chunks(x: jax.Array, kernel: jax.Array, grad: jax.Array, stride: int, padding) -> jax.Array:
    """The weight gradient of `_shifted_sum_padded`, summed over chunks of 4 images in a loop.

    Each of the k*k taps copies its window of the input out before YNNPACK sums its product with the output
    gradient: over the whole batch, k*k passes over memory; over a chunk, the windows stay in cache (1.5-2x faster
    alone at MobileNetV2's 112 and 56 px shapes on the Zen 4 EPYC; 4 images per chunk beat 2 and 8). Chunk j holds
    images j, j + n/4, j + 2n/4 and j + 3n/4, so that a batch split over 1, 2 or 4 devices keeps each chunk's
    images where they are (contiguous chunks would make XLA gather the batch onto every device).
    """
    x_chunks, grad_chunks = (array.reshape(_IMAGES_PER_CHUNK, -1, *array.shape[1:]) for array in (x, grad))

    def add_chunk(j, total):
        x_chunk, grad_chunk = (jax.lax.dynamic_index_in_dim(array, j, axis=1, keepdims=False)
                               for array in (x_chunks, grad_chunks))
        return total + _weight_gradient(x_chunk, kernel, grad_chunk, stride, padding)

    return jax.lax.fori_loop(0, x_chunks.shape[1], add_chunk, jnp.zeros_like(kernel))


def _materialised(value: jax.Array, kernel: jax.Array) -> jax.Array:
    """`value` in a buffer of its own, for the k*k reads of the input gradient's loop.

    Otherwise XLA:CPU fuses the producer (BatchNorm's backward pass) into each of the k*k reads, and the ReLU6
    mask of the layer below into the loop's output: 2-10x slower loops (MobileNetV2's 112 px, 96-channel,
    stride-2 block: 175-370 ms against 30). XLA drops optimization barriers before fusing, but keeps a
    conditional whose predicate it cannot evaluate. A NaN kernel gives a NaN gradient, as it gives a NaN loss,
    where training stops anyway.
    """
    return jax.lax.cond(jnp.isnan(kernel.reshape(-1)[0]), lambda v: jnp.full_like(v, jnp.nan), lambda v: v, value)


_shifted_sum = jax.custom_vjp(
    lambda x, kernel, stride, padding, forms: _shifted_sum_value(x, kernel, stride, padding),
    nondiff_argnums=(2, 3, 4))
_shifted_sum.defvjp(_shifted_sum_forward, _shifted_sum_backward)


def _strided_windows(padded: jax.Array, k: int, stride: int, out_size: tuple[int, int]):
    """(dy, dx, the (N, out_h, out_w, C) slice of `padded` that tap (dy, dx) of a k x k window sees), row-major."""
    batch, _, _, channels = padded.shape
    out_height, out_width = out_size
    for dy in range(k):
        for dx in range(k):
            yield dy, dx, jax.lax.slice(padded, (0, dy, dx, 0),
                                        (batch, dy + stride * (out_height - 1) + 1, dx + stride * (out_width - 1) + 1,
                                         channels), (1, stride, stride, 1))


def max_pool(x: jax.Array, k: int, stride: int, pad: int, shifted_max: bool) -> jax.Array:
    """torch.nn.MaxPool2d(k, stride, pad) on NHWC: padded with -inf, the gradient routed to each window's first
    maximum in row-major order (torch's rule, which XLA's select-and-scatter follows too).

    shifted_max: the maximum of the k*k tap windows (`_tap_slices`), with a backward pass over strided slices
    (`_shifted_max_pool`), which XLA:CPU runs 4x faster than the reduce-window and select-and-scatter of
    `flax.linen.max_pool` (ResNet's stem pool, batch 32 at 224 px: benchmarks/README.md); where the C++ kernels
    run, their forward and backward passes (`_native_max_pool`). Accelerators keep flax's.
    """
    if not shifted_max:
        return nn.max_pool(x, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
    return _shifted_max_pool(x, k, stride, pad, x.shape)


def _max_pool_value(x: jax.Array, k: int, stride: int, pad: int, shape: tuple[int, ...]) -> jax.Array:
    """The pool where nothing differentiates it (a teacher, an evaluation): XLA fuses it with the ReLU before it. In
    float32, the same maximum: XLA:CPU runs such loops in bfloat16 slowly (a bfloat16 ResNet-50's stem BatchNorm,
    ReLU and pool at batch 32 took 162 ms, in float32 from the stem's float32 sums 49 ms; Intel Xeon)."""
    fill = jnp.asarray(-jnp.inf, jnp.float32)
    windows = (jax.lax.pad(window, fill, placement)
               for _, _, window, placement in _tap_slices(x.astype(jnp.float32), k, stride, ((pad, pad), (pad, pad))))
    return functools.reduce(jnp.maximum, windows).astype(x.dtype)


def max_pool_by_kernel(x: jax.Array, k: int) -> bool:
    """Whether `max_pool` of x with a k x k window runs kdep_jax's C++ kernel (`_native_max_pool`): on one CPU
    device, in float32 or bfloat16."""
    return x.dtype in (jnp.float32, jnp.bfloat16) and jax.device_count() == 1 and k * k <= 127 and _native_max_pool()


def pools_before_activation(x: jax.Array, k: int) -> bool:
    """Whether a ResNet's stem pools its conv's sums before their BatchNorm and ReLU (`ResNet.stem`): in bfloat16 on
    a CPU where the AMX kernels and the max-pool kernel run (a GPU's host may have AMX tiles too). ResNet-50's
    bfloat16 forward pass at batch 32 spent 48 ms in XLA's fusion of the BatchNorm, ReLU and pool, 16 in the kernel's
    pool and the BatchNorm of a quarter of the values (0.448 -> 0.419 s); in training, XLA's passes over the stem's
    112 px outputs for the ReLU, its gradient and two of the BatchNorm's reductions ran at 56 px (profiled: 45 -> 11
    ms), the R50 -> R18 step in bfloat16 0.980 -> 0.958 s (Intel Xeon, benchmarks/README.md). In float32, where XLA's
    pool of the ReLU's output took 11 ms and the kernel 16, the forward pass was level."""
    return x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu" and _amx_conv() and max_pool_by_kernel(x, k)


def _max_pool_forward(x: jax.Array, k: int, stride: int, pad: int, shape: tuple[int, ...]):
    """The pool, and what its backward pass keeps: x, or with the C++ kernel (float32, in bfloat16 too) the int8
    number of the tap that holds each output's maximum, a sixteenth of x's size at stride 2."""
    if max_pool_by_kernel(x, k):
        pooled, taps = cpu_kernels.max_pool(x, k, stride, ((pad, pad), (pad, pad)))
        return pooled.astype(x.dtype), taps  # a bfloat16 x's maximum, exactly
    return _max_pool_value(x, k, stride, pad, shape), x


def _max_pool_backward(k: int, stride: int, pad: int, shape: tuple[int, ...], kept: jax.Array, grad: jax.Array):
    """Each output's gradient goes to the first tap that equals the maximum: with the C++ kernel's taps, its backward
    pass; from x, placed back at that tap's strided positions of the padded input by an interior-padded lax.pad,
    over the slices of a padded x, the maximum recomputed from them (XLA runs this chain of selects 3x slower over
    `_tap_slices` or over the forward's maximum, which it then recomputes inside the chain: benchmarks/README.md)."""
    if kept.dtype == jnp.int8:  # in bfloat16: each input's gradients summed in float32, rounded once
        grad_x = cpu_kernels.max_pool_gradient(kept, grad, shape, k, stride, ((pad, pad), (pad, pad)))
        return (grad_x.astype(grad.dtype),)
    x = kept
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    _, padded_height, padded_width, _ = padded.shape
    out_size = [_output_size(size, k, stride, (pad, pad)) for size in x.shape[1:3]]
    out = functools.reduce(jnp.maximum, (window for _, _, window in _strided_windows(padded, k, stride, out_size)))
    zero = jnp.zeros((), grad.dtype)
    taken = jnp.zeros(out.shape, bool)
    grad_padded = jnp.zeros(padded.shape, grad.dtype)
    for dy, dx, window in _strided_windows(padded, k, stride, out_size):
        first_max = (window == out) & ~taken
        taken = taken | first_max
        placement = ((0, 0, 0), (dy, padded_height - dy - stride * (out_size[0] - 1) - 1, stride - 1),
                     (dx, padded_width - dx - stride * (out_size[1] - 1) - 1, stride - 1), (0, 0, 0))
        grad_padded = grad_padded + jax.lax.pad(jnp.where(first_max, grad, zero), zero, placement)
    height, width = x.shape[1:3]
    return (grad_padded[:, pad:pad + height, pad:pad + width, :],)


_shifted_max_pool = jax.custom_vjp(_max_pool_value, nondiff_argnums=(1, 2, 3, 4))
_shifted_max_pool.defvjp(_max_pool_forward, _max_pool_backward)


@functools.cache
def _native_max_pool() -> bool:
    """Whether the max-pool (on one CPU device, in float32 or bfloat16) is kdep_jax's C++ kernels
    (`cpu_kernels.max_pool`, `cpu_kernels.max_pool_gradient`) rather than XLA's maximum and chain of selects over
    strided slices: the kernel gives each output's tap with its maximum, so the backward pass keeps an int8 per output
    instead of the pool's input (the ResNet-18 step's XLA temporaries 692 -> 578 MiB at batch 32). ResNet's stem pool
    at batch 32 with the BatchNorm and ReLU before it, forward and backward: 48-52 ms against XLA's 80 (the earlier
    kernel, which read x again: 44-46); the ResNet-18 step 1.04x (AMD EPYC Zen 5, TCMalloc, benchmarks/README.md). In
    bfloat16 the kernels pool the float32 values of x (the same maximum), where XLA's chain of selects took 2.2 s of
    the ResNet-18 step's 4.1 (Intel Xeon). Where the kernels run (`cpu_kernels.runs_here`); elsewhere XLA's."""
    return cpu_kernels.runs_here()


class DepthwiseConv(nn.Module):
    """A depthwise conv, with the parameters of nn.Conv(C, feature_group_count=C): "kernel" (k, k, 1, C), "bias".

    Torch's symmetric padding kernel_size // 2, or TensorFlow's "SAME" padding when tf_same_padding.
    """
    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    tf_same_padding: bool = False
    use_bias: bool = False
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.features:
            raise ValueError(f"A depthwise conv of {self.features} channels got {x.shape[-1]} input channels")
        kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, self.features),
                            jnp.float32)
        padding = None
        if self.tf_same_padding:
            padding = tuple(same_padding(size, self.kernel_size, self.stride) for size in x.shape[1:3])
        y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                           shifted_sum=jax.default_backend() == "cpu", padding=padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


# torch.nn.Linear's and Conv2d's default weight init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """torch.nn.Linear's and Conv2d's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return bias_init


def torch_linear(features: int, in_features: int, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Dense:
    """A Dense layer with torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    return nn.Dense(features, kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(in_features),
                    dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, kernel_init, dtype: Dtype, name: str, use_bias: bool = True,
          bias_init=nn.initializers.zeros) -> "Dense":
    """A Dense layer with float32 parameters, for the transformers (whose inits differ from torch's default)."""
    return Dense(features, kernel_init, dtype, use_bias, bias_init, name=name)


class Dense(nn.Module):
    """flax's nn.Dense with float32 parameters ("kernel" (K, N), "bias"), its product by `matmul`: by kdep_jax's CPU
    kernel where the variables hold the kernel packed for it (`with_packed_dense_kernels`)."""
    features: int
    kernel_init: Any
    dtype: Dtype
    use_bias: bool = True
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.get_variable(PACKED_KERNELS, "kernel"))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
        return y


PACKED_KERNELS = "packed_kernels"  # the collection of `with_packed_dense_kernels`


def with_packed_dense_kernels(variables: dict) -> dict:
    """`variables` and, where `matmul` can run as kdep_jax's CPU kernel (`_native_dense`), the collection
    PACKED_KERNELS: each transformer Linear layer's kernel packed for it (`cpu_kernels.pack_dense_weights`), ViT's
    q/k/v projection's as well. For a frozen network (a teacher; `teacher.outputs_fn` packs ViT's, where it was
    measured): packed once per program, where XLA would pack them again in each pass of a loop over chunks of images
    (it does not hoist the packing out of the loop)."""
    if not (jax.device_count() == 1 and jax.default_backend() == "cpu" and _native_dense()):
        return variables
    flat = traverse_util.flatten_dict(variables["params"])
    packed = {}
    for path, value in flat.items():
        kernel = value if path[-1] == "kernel" else value.T if path[-1] == "in_proj_weight" else None
        if (kernel is not None and kernel.ndim == 2 and kernel.dtype == jnp.float32
                and kernel.shape[1] % cpu_kernels.DENSE_OUT_BLOCK == 0):
            packed[path] = cpu_kernels.pack_dense_weights(kernel)
    return {**variables, PACKED_KERNELS: traverse_util.unflatten_dict(packed)}


def matmul(x: jax.Array, kernel: jax.Array, packed_kernel: jax.Array | None = None) -> jax.Array:
    """x (..., K) @ kernel (K, N): a Linear layer's product. By kdep_jax's C++ kernel (`cpu_kernels.dense`) where
    the kernel comes packed for it too (`with_packed_dense_kernels`) and x is float32 on one CPU device; its gradient
    is XLA's product's. Otherwise XLA's product (YNNPACK's on CPUs)."""
    if (packed_kernel is not None and x.dtype == jnp.float32 and jax.device_count() == 1
            and jax.default_backend() == "cpu"):
        return _kernel_matmul(x, kernel, packed_kernel)
    return x @ kernel


@jax.custom_vjp
def _kernel_matmul(x: jax.Array, kernel: jax.Array, packed_kernel: jax.Array) -> jax.Array:
    return cpu_kernels.dense(x.reshape(-1, x.shape[-1]), packed_kernel).reshape(*x.shape[:-1], kernel.shape[1])


def _kernel_matmul_forward(x, kernel, packed_kernel):
    return _kernel_matmul(x, kernel, packed_kernel), (x, kernel, packed_kernel)


def _kernel_matmul_backward(residuals, grad):
    x, kernel, packed_kernel = residuals
    return (*jax.vjp(jnp.matmul, x, kernel)[1](grad), jnp.zeros_like(packed_kernel))


_kernel_matmul.defvjp(_kernel_matmul_forward, _kernel_matmul_backward)


@functools.cache
def _native_dense() -> bool:
    """Whether `with_packed_dense_kernels` packs the kernels, so that `matmul` runs as kdep_jax's C++ kernel: on CPUs
    with AMX tiles, where it was measured (an Intel Xeon: ViT-B/16's Linear layers at 788 tokens alone 1.12-1.29x
    YNNPACK's, the ViT-B/16 -> ResNet-18 step with the teacher's batch whole 1.06x the step in chunks without it;
    benchmarks/README.md), and where the kernels run. Other CPUs keep XLA's product until it is measured there."""
    return "amx_tile" in xla_flags.cpu_features() and cpu_kernels.runs_here()


def attention(qkv: jax.Array, num_heads: int, dtype: Dtype) -> jax.Array:
    """torch.nn.MultiheadAttention's core, softmax(q k^T / sqrt(head_dim)) v per head (the softmax in float32), from
    the fused q/k/v projection's output qkv (N, T, 3C): each token's q, k and v side by side, the heads side by side
    within each; to (N, T, C), the heads side by side.

    On one CPU device in float32 where `_native_attention` is on: kdep_jax's C++ kernel (`cpu_kernels.attention`),
    which reads the heads where the projection put them; its gradient is that of XLA's form, computed again from qkv.
    Elsewhere XLA's form: two batched products around a softmax, the heads split and merged by copies."""
    head_dim = qkv.shape[-1] // 3 // num_heads
    if (qkv.dtype == jnp.float32 and jax.device_count() == 1 and jax.default_backend() == "cpu"
            and head_dim % cpu_kernels.ATTENTION_HEAD_DIM_MULTIPLE == 0 and _native_attention()):
        return _kernel_attention(qkv, num_heads)
    return _xla_attention(qkv, num_heads, dtype)


def _xla_attention(qkv: jax.Array, num_heads: int, dtype: Dtype) -> jax.Array:
    batch, length, width = qkv.shape
    head_dim = width // 3 // num_heads
    q, k, v = qkv.reshape(batch, length, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    logits = (q @ k.swapaxes(-1, -2)) * head_dim**-0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width // 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _kernel_attention(qkv: jax.Array, num_heads: int) -> jax.Array:
    return cpu_kernels.attention(qkv, num_heads)


def _kernel_attention_forward(qkv, num_heads):
    return cpu_kernels.attention(qkv, num_heads), qkv


def _kernel_attention_backward(num_heads, qkv, grad):
    return jax.vjp(lambda x: _xla_attention(x, num_heads, jnp.float32), qkv)[1](grad)


_kernel_attention.defvjp(_kernel_attention_forward, _kernel_attention_backward)


@functools.cache
def _native_attention() -> bool:
    """Whether `attention` runs as kdep_jax's C++ kernel: on CPUs with AMX tiles, where it was measured (an Intel
    Xeon: ViT-B/16's attention on 4 images 1.75x, its forward pass 1.07x, the ViT-B/16 -> ResNet-18 step 1.03-1.04x;
    benchmarks/README.md), and where the kernels run. Other CPUs keep XLA's form until it is measured there."""
    return "amx_tile" in xla_flags.cpu_features() and cpu_kernels.runs_here()


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    """torch.nn.LayerNorm over the last axis. Statistics in float32 and in two passes, as torch computes them
    (flax's default one-pass variance E[x^2] - E[x]^2 loses digits when the mean is large)."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(), the exact form (flax's nn.gelu defaults to the tanh approximation).

    On x86 CPUs with AVX2 and FMA it runs inside a conditional whose predicate XLA cannot evaluate (both branches
    compute it), so that its value lands in a buffer of its own. Otherwise XLA:CPU folds its multiplications into
    the YNNPACK dot product of the Linear layer that reads it, which then reads three full-size arrays instead of
    one: Swin-T's forward pass 1.18x, ConvNeXt-T's 1.17x, ViT-B/16's 1.11x. In the conditional, torch's formula
    x / 2 * (1 + erf(x / sqrt(2))) is 5% faster than flax's, which goes through erfc (benchmarks/README.md).
    """
    if jax.default_backend() == "cpu" and _materialise_gelu():
        # The first element of each sample: a batch-sharded x is never sliced across devices.
        any_nan = jnp.isnan(x.reshape(x.shape[0], -1)[:, 0]).any()
        return jax.lax.cond(any_nan, _gelu_erf, _gelu_erf, x)
    return nn.gelu(x, approximate=False)


def _gelu_erf(x: jax.Array) -> jax.Array:
    return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@functools.cache
def _materialise_gelu() -> bool:
    """Whether `gelu` runs in a conditional of its own: measured on AVX-512 Intel Xeon and AMD EPYC CPUs, and on an
    AVX2 CPU simulated on Zen 4 (Swin-T's, ConvNeXt-T's and ViT-B/16's forward passes 1.11x, 1.22x and 1.05x;
    benchmarks/README.md)."""
    return xla_flags.avx2_fma()


def relu(x: jax.Array) -> jax.Array:
    """torch.nn.ReLU: NaN stays NaN, the gradient at 0 is 0 (as flax's nn.relu).

    On x86 CPUs with AVX2 and FMA a select: XLA:CPU runs a loop fusion that ends in jnp.maximum (flax's nn.relu)
    slower than one that ends in a select, and keeps more of its buffers alive: ResNet-50's forward pass at batch 32
    0.82 -> 0.71 s (XLA temp 490 -> 319 MiB); in one process 1.15x on it at batch 8, 1.04x on the ResNet-50 ->
    ResNet-18 and -> MobileNetV2 steps (AMD EPYC Zen 5, benchmarks/README.md; ReLU6 as selects made MobileNetV2's
    step slower: it keeps jax.nn.relu6); on an AVX2 CPU simulated on Zen 4 the ResNet-18 and MobileNetV2 steps and
    ResNet-50's forward pass 1.05-1.06x. Accelerators and other CPUs keep flax's form.
    """
    if jax.default_backend() == "cpu" and _relu_as_select():
        return _select_relu(x)
    return nn.relu(x)


@functools.cache
def _relu_as_select() -> bool:
    return xla_flags.avx2_fma()


@jax.custom_jvp
def _select_relu(x: jax.Array) -> jax.Array:
    return jnp.where(x < 0, jnp.zeros_like(x), x)  # not x > 0: NaN stays NaN


_select_relu.defjvps(lambda tangent, value, x: jnp.where(x > 0, tangent, jnp.zeros_like(tangent)))


def stochastic_depth(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """torchvision's StochasticDepth(rate, "row") on a residual branch x, called from module's compact method.

    In train mode, and only when the caller passes a "dropout" rng (as for MobileNetV2's dropout), each sample's
    branch is zeroed with probability rate and the others scaled by 1 / (1 - rate); otherwise x is returned.
    """
    if not train or rate == 0.0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * keep.astype(x.dtype) / (1.0 - rate)


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d: eps 1e-5; train mode normalises with the biased batch variance and moves the
    running variance towards the *unbiased* one with momentum 0.1. Statistics are float32 whatever the dtype.

    No axis_name: under jax.jit over a sharded global batch the batch mean is already global (synchronised BN).
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, affine: bool = False, signs: jax.Array | None = None,
                 statistics: tuple[jax.Array, jax.Array, int] | None = None):
        """The normalised x; with affine, the map itself, (scale, shift) per channel in float32, for a consumer that
        applies it (`ConvOfActivation`). signs (one +1 or -1 per channel): the statistics are those of x times them,
        exactly, without a pass over that product (`ResNet.stem`). statistics (mean, variance, count), in training:
        the batch statistics of `count` values per channel, computed elsewhere (`PooledConv`), of which x has the
        channels."""
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // channels if statistics is None else statistics[2]
            if count < 2:
                raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got input {x.shape}")
            if statistics is not None:
                mean, var, _ = statistics
            elif _moments_by_kernel(x, self.dtype):
                mean, var = batch_moments(x)
            else:
                mean = x.astype(jnp.float32).mean(axes)
                # Two-pass: no cancellation for large means. The variance's gradient through the mean is exactly
                # zero (the centred values sum to zero), and autodiff would spend two passes over x computing it.
                var = jnp.square(x.astype(jnp.float32) - jax.lax.stop_gradient(mean)).mean(axes)
            if signs is not None:  # the negated values' sums, negated: the same rounding
                mean = mean * signs
            if not self.is_initializing():
                unbiased_var = var * (count / (count - 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
        else:
            mean, var = running_mean.value, running_var.value
        # torch's CPU kernel's form, x * alpha + beta: its backward pass needs only x, where that of
        # (x - mean) * alpha would keep the centred x too (MobileNetV2 step 1.08x, XLA temp 1.78 -> 1.03 GiB).
        alpha = scale * jax.lax.rsqrt(var + self.epsilon)
        if affine:
            return alpha, bias - mean * alpha
        y = x.astype(jnp.float32) * alpha + (bias - mean * alpha)
        return y.astype(self.dtype)


def _moments_by_kernel(x: jax.Array, dtype: Dtype) -> bool:
    """Whether a BatchNorm's batch statistics in training come from the C++ kernel (`batch_moments`): in a bfloat16
    model on one CPU device where the AMX kernels run. XLA wrote a bfloat16 x out in float32 and then x less its mean
    before reducing each (the stem's 112 px float32 sums: two passes of 13-23 ms and reductions of 5-9 ms): the
    R50 -> R18 step in bfloat16 0.960 -> 0.910 s, the memory it faults in 0.9 -> 0.57 GiB a call (Intel Xeon,
    benchmarks/README.md)."""
    return (dtype == jnp.bfloat16 and x.dtype in (jnp.float32, jnp.bfloat16) and x.ndim == 4
            and jax.default_backend() == "cpu" and jax.device_count() == 1 and _amx_conv())


@jax.custom_vjp
def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each channel's mean and biased variance over all but x's last axis (NHWC), in float32, by the C++ kernel
    (float64 sums); the gradient is that of BatchNorm's two-pass form."""
    return cpu_kernels.batch_moments(x)


def _batch_moments_forward(x):
    mean, var = cpu_kernels.batch_moments(x)
    return (mean, var), (x, mean)


def _batch_moments_backward(residuals, grads):
    x, mean = residuals
    grad_mean, grad_var = grads
    count = x.size // x.shape[-1]
    return (((grad_mean + 2.0 * (x.astype(jnp.float32) - mean) * grad_var) / count).astype(x.dtype),)


batch_moments.defvjp(_batch_moments_forward, _batch_moments_backward)


def conv_bn(x: jax.Array, features: int, kernel_size: int, stride: int, train: bool, name: str,
            depthwise: bool = False, dtype: Dtype = jnp.float32) -> jax.Array:
    """conv2d then BatchNorm, named `{name}_0` and `{name}_1` like torchvision's Conv2dNormActivation.

    Call it inside a compact method: the layers become submodules of the caller. Returns the BN output
    (no activation), so that callers can keep the pre-activation value.
    """
    if depthwise:
        x = DepthwiseConv(features, kernel_size, stride, dtype, name=f"{name}_0")(x)
    else:
        x = conv2d(features, kernel_size, stride, dtype, name=f"{name}_0")(x)
    return BatchNorm(dtype=dtype, name=f"{name}_1")(x, train)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C), averaged in float32."""
    return x.astype(jnp.float32).mean(axis=(1, 2))
