"""The Flax backbones against torchvision: eval and train mode, bfloat16, width, initialisation."""
import copy
import functools
import math
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from kdep_jax.convert import from_torchvision, to_torchvision
from kdep_jax.models import cpu_kernels, create_model, feature_dim, layers, resnet
from kdep_jax.models.layers import BatchNorm, DepthwiseConv, conv2d, depthwise_conv, max_pool, torch_linear

PARITY_TOLERANCE = 1e-4
CNN_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")  # the transformers: test_transformers.py


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN running statistics and affine parameters, so that eval mode exercises all four tensors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
    return model


def torchvision_outputs(model: torch.nn.Module, images_nchw: torch.Tensor) -> dict[str, np.ndarray]:
    """logits, pre-ReLU and pooled features and the stage maps (as NHWC), read from torchvision's own layers by
    hooks: ResNet's layer1..layer4, MobileNetV2's features.3, .6, .13 and .18."""
    captured = {}
    if isinstance(model, torchvision.models.MobileNetV2):
        stages = [model.features[index] for index in (3, 6, 13, 18)]
    else:
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    hooks = [stage.register_forward_hook(lambda m, i, o, name=f"stage{index}": captured.__setitem__(name, o.clone()))
             for index, stage in enumerate(stages, start=1)]
    if isinstance(model, torchvision.models.MobileNetV2):
        final_bn = model.features[-1][1]
        hooks.append(final_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("pre_relu", o.clone())))
        hooks.append(model.features.register_forward_hook(lambda m, i, o: captured.__setitem__("last", o.clone())))
    else:
        block = model.layer4[-1]
        final_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        # The block adds the identity to the BN output in place, so clone the BN output and the block input.
        hooks.append(final_bn.register_forward_hook(lambda m, i, o: captured.__setitem__("bn", o.clone())))
        hooks.append(block.register_forward_pre_hook(lambda m, i: captured.__setitem__("input", i[0].clone())))
        hooks.append(model.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("last", o.clone())))
    with torch.no_grad():
        logits = model(images_nchw)
        if "bn" in captured:
            identity = captured["input"] if block.downsample is None else block.downsample(captured["input"])
            captured["pre_relu"] = captured["bn"] + identity
    for hook in hooks:
        hook.remove()
    return {"logits": logits.numpy(), "pre_relu": captured["pre_relu"].mean((2, 3)).numpy(),
            "pooled": captured["last"].mean((2, 3)).numpy(),
            **{f"stage{index}": captured[f"stage{index}"].numpy().transpose(0, 2, 3, 1) for index in range(1, 5)}}


@functools.cache
def jitted_apply(arch: str, dtype=jnp.float32, train: bool = False, width: float = 1.0):
    """One compiled forward per configuration: XLA's per-op compiles make eager mode slower on CPU."""
    model = create_model(arch, dtype=dtype, width=width)
    if train:
        return jax.jit(lambda variables, images: model.apply(variables, images, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def as_dict(logits, features) -> dict[str, np.ndarray]:
    return {"logits": np.asarray(logits), **{name: np.asarray(value) for name, value in features.items()}}


@functools.cache
def random_torchvision_model(arch: str):
    """(eval-mode torchvision model with random weights and BN statistics, its converted variables)."""
    torch.manual_seed(CNN_ARCHS.index(arch))
    model = randomize_batchnorm(getattr(torchvision.models, arch)(), seed=CNN_ARCHS.index(arch)).eval()
    return model, from_torchvision(model.state_dict(), arch)


@pytest.fixture(scope="module")
def images():
    """(NCHW torch images, the same as NHWC numpy), 2 x 64 x 64."""
    nchw = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return nchw, nchw.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("arch", CNN_ARCHS)
def test_eval_mode_matches_torchvision(arch, images):
    model, variables = random_torchvision_model(arch)
    expected = torchvision_outputs(model, images[0])
    ours = as_dict(*jitted_apply(arch)(variables, images[1]))
    errors = {name: relative_error(ours[name], expected[name]) for name in expected}
    print(f"\n{arch} eval-mode parity (max abs error / max abs value): "
          + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    assert all(ours[name].shape == expected[name].shape for name in expected)
    assert max(errors.values()) < PARITY_TOLERANCE, errors


def every_cpu_kernel_on(monkeypatch):
    """What one process on an AVX-512 CPU runs, on any CPU: every C++ conv and max-pool kernel, on one device (the
    suite's process has 4 CPU devices), F(4x4, 3x3) from 16 px (64 px images: a ResNet's layer1)."""
    for switch in ("_native_conv", "_winograd_conv", "_winograd_4x4_conv", "_winograd_weight_gradient",
                   "_native_conv_weight_gradient", "_weight_gradient_of_activation", "_native_max_pool"):
        monkeypatch.setattr(layers, switch, lambda: True)
    monkeypatch.setattr(layers, "_WINOGRAD_4X4_MIN_SIZE", 16)
    monkeypatch.setattr(jax, "device_count", lambda: 1)


def test_resnet50_with_the_cpu_kernels_matches_torchvision(images, monkeypatch):
    """What one process on an AVX-512 CPU runs: ResNet-50's convs by kdep_jax's C++ kernels (Winograd's F(4x4, 3x3)
    from 16 px here, F(2x2, 3x3) below, the direct kernel for the stem and the strided convs), as close to
    torchvision as XLA's convolutions are: F(4x4, 3x3)'s rounding (tests above) stays far inside the tolerance."""
    every_cpu_kernel_on(monkeypatch)
    model, variables = random_torchvision_model("resnet50")
    network = create_model("resnet50")
    apply = jax.jit(lambda variables, images: network.apply(variables, images, train=False))
    program = apply.lower(variables, images[1]).compile().as_text()
    assert all(f'"{kernel}"' in program for kernel in ("kdep_winograd_conv_4x4", "kdep_winograd_conv", "kdep_conv"))
    expected = torchvision_outputs(model, images[0])
    ours = as_dict(*apply(variables, images[1]))
    errors = {name: relative_error(ours[name], expected[name]) for name in expected}
    print("\nresnet50 with the CPU kernels (max abs error / max abs value): "
          + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    assert max(errors.values()) < PARITY_TOLERANCE, errors


def test_resnet18_gradients_with_the_cpu_kernels_match_torch_float64(images, monkeypatch):
    """What one process on an AVX-512 CPU trains with: ResNet-18's train-mode gradients through every C++ kernel
    (F(4x4, 3x3) and F(2x2, 3x3) forward passes and input gradients, Winograd weight gradients, of a BatchNorm's
    activation too, the direct kernels, the max-pool's taps), against torch's autograd in float64. The kernels'
    rounding (torch's own float32 gradients are 1e-5 away, these 5e-5) stays well inside the tolerance."""
    every_cpu_kernel_on(monkeypatch)
    model, variables = random_torchvision_model("resnet18")
    model = copy.deepcopy(model).double().train()
    cotangent = torch.randn(2, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (model(images[0].double()) * cotangent).sum().backward()
    network = create_model("resnet18")

    def loss(params, images):
        (logits, _), _ = network.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                                       train=True, mutable=["batch_stats"])
        return jnp.sum(logits * cotangent.numpy().astype(np.float32))

    gradient = jax.jit(jax.grad(loss))
    program = gradient.lower(variables["params"], images[1]).compile().as_text()
    for kernel in ("kdep_winograd_conv_4x4", "kdep_winograd_conv", "kdep_winograd_weight_gradient_of_activation",
                   "kdep_winograd_weight_gradient", "kdep_conv", "kdep_conv_input_gradient",
                   "kdep_conv_weight_gradient", "kdep_max_pool", "kdep_max_pool_gradient"):
        assert f'"{kernel}"' in program, kernel
    ours = to_torchvision({"params": gradient(variables["params"], images[1]),
                           "batch_stats": variables["batch_stats"]}, "resnet18")
    errors = {name: relative_error(ours[name], parameter.grad.numpy()) for name, parameter in model.named_parameters()}
    print(f"\nresnet18 gradients with the CPU kernels: largest error {max(errors.values()):.2e} "
          f"({max(errors, key=errors.get)})")
    assert max(errors.values()) < 2e-4, errors


@pytest.mark.parametrize("moments_by_kernel", [False, True])
def test_batchnorm_train_step_matches_torch(moments_by_kernel, monkeypatch):
    """Normalises with the biased batch variance; running stats move with momentum 0.1 towards the unbiased one;
    the gradients of the input, scale and bias are torch's. With the batch statistics from XLA's two passes, or
    from the C++ kernel's float64 sums (`layers.batch_moments`, which a bfloat16 model on the AMX tiles takes)."""
    if moments_by_kernel:
        if not cpu_kernels.runs_here():
            pytest.skip("kdep_jax's C++ kernels run on x86 CPUs with AVX2 and FMA, where they build")
        monkeypatch.setattr(layers, "_moments_by_kernel", lambda x, dtype: True)
    generator = torch.Generator().manual_seed(0)
    torch_bn = randomize_batchnorm(torch.nn.BatchNorm2d(5), seed=1).train()
    x = (3.0 + 2.0 * torch.randn(2, 5, 3, 3, generator=generator)).requires_grad_()  # 18 values per channel
    cotangent = torch.randn(2, 5, 3, 3, generator=generator)
    variables = {"params": {"scale": torch_bn.weight.detach().numpy(), "bias": torch_bn.bias.detach().numpy()},
                 "batch_stats": {"mean": torch_bn.running_mean.numpy().copy(),
                                 "var": torch_bn.running_var.numpy().copy()}}

    def forward(x_nhwc, params):
        return BatchNorm().apply({**variables, "params": params}, x_nhwc, train=True, mutable=["batch_stats"])

    (y, updates), backward = jax.vjp(forward, x.detach().numpy().transpose(0, 2, 3, 1), variables["params"])
    grad_x, grad_params = backward((jnp.asarray(cotangent.numpy().transpose(0, 2, 3, 1)),
                                    jax.tree.map(jnp.zeros_like, updates)))
    expected = torch_bn(x)
    expected.backward(cotangent)
    np.testing.assert_allclose(y, expected.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_x, x.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_params["scale"], torch_bn.weight.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_params["bias"], torch_bn.bias.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], torch_bn.running_mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], torch_bn.running_var.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_moments_kernel_matches_float64(dtype):
    """The C++ kernel's batch mean and biased variance (`cpu_kernels.batch_moments`) against numpy's float64, over
    fewer pixels than a chunk and over several, on values whose mean is 1000 times their spread: float64 sums keep
    E[x^2] - E[x]^2 from cancelling (float32 ones would lose the variance whole)."""
    if not cpu_kernels.runs_here():
        pytest.skip("kdep_jax's C++ kernels run on x86 CPUs with AVX2 and FMA, where they build")
    rng = np.random.default_rng(0)
    for shape in [(3, 7, 9, 40), (2, 16, 24, 64)]:
        x = jnp.asarray(1000.0 + rng.normal(size=shape), dtype)
        mean, var = jax.jit(cpu_kernels.batch_moments)(x)
        values = np.asarray(x, np.float64).reshape(-1, shape[-1])
        np.testing.assert_allclose(mean, values.mean(0), rtol=1e-7)
        np.testing.assert_allclose(var, values.var(0), rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])  # the students, which train with batch statistics
def test_train_mode_network_matches_torchvision(arch, images):
    """A whole train-mode forward: outputs and every BN's running stats. Batch statistics of 2 x 2 x 2 values
    per channel in the last stage amplify float32 rounding: torch's own float32 result is ~1e-4 away from its
    float64 one here, so the tolerance is 1e-3 (the BN rule itself is checked to 1e-5 above)."""
    model, variables = random_torchvision_model(arch)
    model = copy.deepcopy(model).train()
    if arch == "mobilenet_v2":
        model.classifier[0].eval()  # no dropout: ours applies it only when given a "dropout" rng
    expected = torchvision_outputs(model, images[0])
    outputs, updates = jitted_apply(arch, train=True)(variables, images[1])
    ours = as_dict(*outputs)
    output_errors = {name: relative_error(ours[name], expected[name]) for name in expected}
    ours_state = to_torchvision({"params": variables["params"], **updates}, arch)
    torch_state = model.state_dict()
    stats_error = max(relative_error(ours_state[key], torch_state[key].numpy())
                      for key in torch_state if key.endswith(("running_mean", "running_var")))
    print(f"\n{arch} train-mode: running stats max relative error {stats_error:.2e}, outputs "
          + ", ".join(f"{name} {error:.2e}" for name, error in output_errors.items()))
    assert stats_error < 1e-3
    assert max(output_errors.values()) < 1e-3, output_errors


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_bfloat16_close_to_float32_with_float32_params(arch, images):
    shapes = jax.eval_shape(create_model(arch, dtype=jnp.bfloat16).init, jax.random.key(0), images[1])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    _, variables = random_torchvision_model(arch)
    reference = as_dict(*jitted_apply(arch)(variables, images[1]))
    ours = as_dict(*jitted_apply(arch, dtype=jnp.bfloat16)(variables, images[1]))
    errors = {name: relative_error(ours[name], reference[name]) for name in reference}
    print(f"\n{arch} bfloat16 vs float32: " + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
    assert all(value.dtype == np.float32 for value in ours.values())
    assert max(errors.values()) < 5e-2, errors


@pytest.mark.parametrize("arch, width, expected", [
    ("resnet18", 1.0, 512), ("resnet34", 1.0, 512), ("resnet50", 1.0, 2048), ("mobilenet_v2", 1.0, 1280),
    ("resnet18", 0.25, 128), ("resnet34", 0.25, 128), ("resnet50", 0.25, 512), ("mobilenet_v2", 0.25, 1280),
    ("mobilenet_v2", 1.4, 1792), ("efficientnet_lite0", 1.0, 1280), ("efficientnet_lite4", 0.5, 1280),
])
def test_feature_dim(arch, width, expected):
    assert feature_dim(arch, width) == expected


@pytest.mark.parametrize("arch", CNN_ARCHS)
def test_narrow_model_features_have_feature_dim(arch):
    model = create_model(arch, num_classes=None, width=0.25)
    (logits, features), _ = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    assert logits is None
    assert features["pre_relu"].shape == features["pooled"].shape == (2, feature_dim(arch, 0.25))


@pytest.mark.parametrize("width", [0.35, 0.5, 1.4])
def test_mobilenet_v2_width_matches_torchvision_width_mult(width):
    """from_torchvision checks every key and shape against the model create_model builds at this width."""
    variables = from_torchvision(torchvision.models.mobilenet_v2(width_mult=width).state_dict(), "mobilenet_v2",
                                 width=width)
    assert variables["params"]["classifier_1"]["kernel"].shape == (feature_dim("mobilenet_v2", width), 1000)


def test_unknown_arch_lists_known_archs():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, mobilenet_v2"):
        create_model("vgg16")


def test_initialisers_follow_torchvision():
    """kaiming_normal(fan_out) convs (depthwise too), BN weight 1 / bias 0, torch.nn.Linear's default for fc."""
    key = jax.random.key(0, impl="rbg")  # XLA compiles threefry's normal sampler slowly on CPU
    for shape, conv, in_channels in (((3, 3, 64, 128), conv2d(128, 3), 64),
                                     ((3, 3, 1, 2048), DepthwiseConv(2048, 3), 2048)):
        kernel = conv.init(key, jnp.zeros((1, 4, 4, in_channels)))
        kernel = np.asarray(kernel["params"]["kernel"])
        assert kernel.shape == shape
        assert kernel.std() == pytest.approx(np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), rel=0.05)
    bn = BatchNorm().init(key, jnp.zeros((2, 2, 2, 8)), train=False)
    np.testing.assert_array_equal(bn["params"]["scale"], np.ones(8))
    np.testing.assert_array_equal(bn["params"]["bias"], np.zeros(8))
    fc = torch_linear(1000, 512).init(key, jnp.zeros((1, 512)))["params"]
    bound = 1 / np.sqrt(512)
    assert np.abs(fc["kernel"]).max() <= bound and np.abs(fc["bias"]).max() <= bound
    assert np.asarray(fc["kernel"]).std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


@pytest.mark.parametrize("stride, size, kernel_size, padding", [
    (1, 7, 3, None), (2, 7, 3, None), (2, 8, 3, None),
    (2, 8, 3, ((0, 1), (1, 1))),  # TensorFlow's "SAME" for a 3x3/2 conv on 8 rows, 9 columns (EfficientNet-Lite)
    (1, 1, 3, None), (2, 2, 5, None),  # taps that only ever see padding (one row; 5x5 on two rows)
    (1, 6, 5, ((1, 3), (2, 2))), (2, 9, 7, None),  # uneven padding; ConvNeXt's 7x7
])
@pytest.mark.parametrize("forms", ["generic", "avx512", "avx512_one_device", "avx2_one_device"])
def test_depthwise_shifted_sum_equals_the_grouped_convolution(stride, size, kernel_size, padding, forms,
                                                               monkeypatch):
    """The CPU form (sum of shifted products) against XLA's grouped convolution: values and both gradients, in
    the forms of AVX-512 CPUs (gradients in buffers of their own, the weight gradient over chunks of the batch,
    wide kernels' input padded once; on one device, both gradients from kdep_jax's C++ kernels), of AVX2 CPUs (the
    same, the weight gradient in one pass where the kernels do not run) and of the others. Batch 8: two chunks."""
    avx512_forms, x86_forms = forms.startswith("avx512"), forms != "generic"
    monkeypatch.setattr(layers, "_materialise_gradients", lambda: x86_forms)
    monkeypatch.setattr(layers, "_chunk_weight_gradient", lambda: avx512_forms)
    monkeypatch.setattr(layers, "_pad_wide_kernels", lambda: x86_forms)
    monkeypatch.setattr(layers, "_native_weight_gradient", lambda: x86_forms)
    monkeypatch.setattr(layers, "_native_input_gradient", lambda: x86_forms)
    if forms.endswith("one_device"):  # the suite's process has 4 CPU devices; `python -m kdep_jax.main` has one
        monkeypatch.setattr(jax, "device_count", lambda: 1)
    rng = np.random.default_rng(stride * size)
    x = jnp.asarray(rng.normal(size=(8, size, size + 1, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 6)), jnp.float32)
    (top, bottom), (left, right) = padding or ((kernel_size // 2,) * 2,) * 2
    out_shape = (8, (size + top + bottom - kernel_size) // stride + 1,
                 (size + 1 + left + right - kernel_size) // stride + 1, 6)
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(shifted_sum):
        # A BatchNorm-like producer of the cotangent and a ReLU-like consumer of the input gradient, as in
        # MobileNetV2: what XLA fuses into the backward pass's loops.
        out, pullback = jax.vjp(lambda x, k: depthwise_conv(x, k, stride, shifted_sum, padding), x, kernel)
        grad_x, grad_kernel = pullback(cotangent * 0.5 + 0.25)
        return out, jnp.where(x > 0, grad_x, 0.0), grad_kernel

    program = value_and_grads.lower(True).compile().as_text()
    for native_kernel in ("kdep_depthwise_weight_gradient", "kdep_depthwise_input_gradient"):
        assert (native_kernel in program) == forms.endswith("one_device")
    for shifted, conv in zip(value_and_grads(True), value_and_grads(False)):
        assert shifted.shape == conv.shape
        np.testing.assert_allclose(shifted, conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, batch, size, in_channels, out_channels, kernel_size, stride, padding", [
    ("depthwise", 3, 9, 37, 37, 3, 1, ((1, 1), (1, 1))),  # 37 channels: two 16-channel blocks and a tail of 5
    ("depthwise", 2, 12, 32, 32, 3, 2, ((1, 1), (1, 1))),  # torch's padding
    ("depthwise", 2, 9, 16, 16, 3, 2, ((0, 1), (0, 1))),  # TensorFlow's
    ("depthwise", 1, 8, 5, 5, 5, 2, ((2, 2), (2, 2))),
    ("depthwise", 2, 6, 20, 20, 5, 1, ((1, 3), (2, 2))),  # uneven padding
    ("depthwise", 2, 9, 7, 7, 7, 1, ((3, 3), (3, 3))),
    ("depthwise", 1, 1, 3, 3, 3, 1, ((1, 1), (1, 1))),  # one pixel: only the centre tap sees the image
    # 40 x 43 and 20 x 22 output pixels: bands of 2 and 5 rows
    ("depthwise", 1, 40, 16, 16, 3, 1, ((1, 1), (1, 1))), ("depthwise", 1, 40, 16, 16, 3, 2, ((0, 1), (0, 1))),
    ("dense", 2, 20, 3, 72, 7, 2, ((3, 3), (3, 3))),  # ResNet's stem: output channels 32 + 32 + a tail of 8
    # RGB inputs, copied band by band: 24 x 25 and 30 x 33 output pixels, bands of 21 and 16 rows (two per image)
    ("dense", 1, 47, 3, 64, 7, 2, ((3, 3), (3, 3))), ("dense", 2, 30, 3, 40, 3, 1, ((1, 1), (1, 1))),
    ("dense", 2, 16, 3, 32, 3, 2, ((1, 1), (1, 1))),  # MobileNetV2's stem
    ("dense", 2, 7, 13, 33, 3, 1, ((1, 1), (1, 1))),  # 13 input channels: narrower than a block of 14, copied too
    ("dense", 1, 9, 1, 16, 5, 2, ((1, 2), (2, 1))), ("dense", 3, 5, 4, 8, 3, 1, ((0, 2), (1, 1))),  # no 32-block
    ("dense", 1, 1, 3, 40, 3, 1, ((1, 1), (1, 1))),
    ("dense", 2, 8, 64, 72, 3, 2, ((1, 1), (1, 1))),  # a ResNet's first stage: input channels in blocks of 14 and 8
    # 20 x 23 output pixels: chunks of 7 images (7 and 2), bands of 23 rows that run across images; 3 blocks of 32
    ("dense", 9, 20, 40, 96, 3, 1, ((1, 1), (1, 1))),
    # 5x5 taps, uneven padding: the rows of x a band copies; 20 input channels (14 + 6), 40 output channels (32 + 8)
    ("dense", 2, 6, 20, 40, 5, 1, ((1, 3), (2, 2))),
    # Winograd's F(2x2, 3x3): 7 x 10 px, 4 x 5 tiles (the last row and column half outside), one band of 8 tile rows
    ("winograd", 2, 7, 16, 32, 3, 1, ((1, 1), (1, 1))),
    # 20 x 23 px: chunks of 7 images (7 and 2), each split into 4 groups of 4 elements; bands of 11 tile rows
    ("winograd", 9, 20, 48, 96, 3, 1, ((1, 1), (1, 1))),
    ("winograd", 40, 5, 32, 64, 3, 1, ((1, 1), (1, 1))),  # one chunk of 40 images, 8 groups of 2 elements
    ("winograd", 1, 1, 16, 16, 3, 1, ((1, 1), (1, 1))),  # 1 x 4 px: one row of tiles, half outside
    # The input given as relu(x * scale + shift): the padding must stay zero
    ("winograd of activation", 2, 7, 16, 32, 3, 1, ((1, 1), (1, 1))),
    ("winograd of activation", 9, 20, 48, 96, 3, 1, ((1, 1), (1, 1))),
])
def test_native_weight_gradients_match_float64(kind, batch, size, in_channels, out_channels, kernel_size,
                                               stride, padding):
    """kdep_jax's C++ kernels for the weight gradients of a depthwise conv and of a dense one (direct and by
    Winograd's F(2x2, 3x3), of x or of relu(x * scale + shift) computed from x) against numpy float64: for every
    tap, the products of the zero-padded input's strided window with the output gradient, summed over batch and
    space, per channel (depthwise) or for every input and output channel."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(size * out_channels)
    x = rng.normal(size=(batch, size, size + 3, in_channels)).astype(np.float32)
    conv_input = x.astype(np.float64)
    if kind == "winograd of activation":
        activation = tuple(rng.normal(size=in_channels).astype(np.float32) for _ in range(2))
        conv_input = np.maximum(conv_input * activation[0] + activation[1], 0.0)
    (top, bottom), (left, right) = padding
    padded = np.pad(conv_input, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = ((padded.shape[axis] - kernel_size) // stride + 1 for axis in (1, 2))
    grad = rng.normal(size=(batch, out_h, out_w, out_channels)).astype(np.float32)
    expected = np.zeros((kernel_size, kernel_size, 1 if kind == "depthwise" else in_channels, out_channels))
    for i in range(kernel_size):
        for j in range(kernel_size):
            window = padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            expected[i, j] = np.einsum("nhwc,nhwc->c" if kind == "depthwise" else "nhwc,nhwo->co", window,
                                       grad.astype(np.float64))
    if kind == "winograd":
        gradient = cpu_kernels.winograd_weight_gradient
    elif kind == "winograd of activation":
        gradient = functools.partial(cpu_kernels.winograd_weight_gradient, activation=activation)
    else:
        kernel = cpu_kernels.depthwise_weight_gradient if kind == "depthwise" else cpu_kernels.conv_weight_gradient
        gradient = functools.partial(kernel, kernel_size=kernel_size, stride=stride, padding=padding)
    ours = jax.jit(gradient)(jnp.asarray(x), jnp.asarray(grad))
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


_SAME_3X3 = ((1, 1), (1, 1))


@pytest.mark.parametrize("tile, batch, height, width, in_channels, out_channels, kernel_size, stride, padding", [
    (None, 2, 20, 22, 3, 64, 7, 2, ((3, 3), (3, 3))),  # ResNet's stem: two blocks of 32 output channels
    (None, 2, 16, 16, 3, 32, 3, 2, _SAME_3X3),  # MobileNetV2's stem
    (None, 1, 5, 31, 13, 32, 3, 1, _SAME_3X3),  # 31 columns: blocks of 11, 10 and 10 pixels
    (None, 3, 7, 7, 40, 32, 3, 1, _SAME_3X3),  # 7 px: each image one band of rows
    (None, 1, 30, 9, 8, 32, 3, 1, _SAME_3X3),  # bands of 13 rows of 9 pixels, the last of 4
    (None, 1, 61, 13, 8, 32, 3, 2, _SAME_3X3),  # stride 2: bands of 16 and 15 rows, reading 33 and 31 rows of x
    (None, 2, 9, 10, 6, 32, 3, 2, ((0, 1), (0, 1))),  # TensorFlow's "SAME" padding of a stride-2 conv
    (None, 2, 6, 8, 5, 32, 5, 1, ((1, 3), (2, 2))),  # uneven padding
    (None, 1, 1, 1, 3, 32, 3, 1, _SAME_3X3),  # one pixel: only the centre tap sees the image
    (2, 1, 5, 31, 16, 32, 3, 1, _SAME_3X3),  # 16 tiles a row, the last half outside; 3 rows of tiles
    (2, 3, 7, 7, 48, 64, 3, 1, _SAME_3X3),  # 7 px: the 3 images' 16 tiles each in one task, two blocks of channels
    (2, 9, 5, 5, 16, 32, 3, 1, _SAME_3X3),  # 5 px: 9 tiles an image, tasks of 7 images and of 2
    (2, 2, 14, 14, 64, 32, 3, 1, _SAME_3X3),  # bands of 2 rows of 7 tiles, the last band one row
    (2, 2, 9, 4, 32, 96, 3, 1, _SAME_3X3),  # 2 tiles a row: the whole image one band of 5 rows
    (2, 1, 1, 1, 16, 32, 3, 1, _SAME_3X3),  # one pixel: one tile, three quarters outside
    (4, 1, 5, 31, 16, 32, 3, 1, _SAME_3X3),  # F(4x4, 3x3): 8 tiles a row, the last 3 columns outside; 2 rows
    (4, 2, 28, 28, 32, 64, 3, 1, _SAME_3X3),  # 28 px: 4 bands of 2 rows of 7 tiles, two blocks of channels
    (4, 3, 14, 14, 48, 32, 3, 1, _SAME_3X3),  # 14 px: the image's 16 tiles one band, its last row and column half out
    (4, 2, 9, 4, 32, 96, 3, 1, _SAME_3X3),  # 1 tile a row: the whole image one band of 3 rows
    (4, 1, 1, 1, 16, 32, 3, 1, _SAME_3X3),  # one pixel: one tile, 15 of its 16 pixels outside
])
def test_native_conv_matches_float64(tile, batch, height, width, in_channels, out_channels, kernel_size, stride,
                                     padding):
    """kdep_jax's C++ conv kernels, direct and Winograd's F(2x2, 3x3) and F(4x4, 3x3) (tile), against numpy float64:
    for every output pixel, the zero-padded input's k x k window times the kernel, summed over taps and input
    channels. F(4x4, 3x3)'s transforms have coefficients up to 8 (its points 0, +-1, +-2): it is allowed 2e-5 of
    the largest output where the others are allowed 1e-6."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(width * out_channels + height)
    x = rng.normal(size=(batch, height, width, in_channels)).astype(np.float32)
    kernel = rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)).astype(np.float32)
    (top, bottom), (left, right) = padding
    padded = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h, out_w = ((padded.shape[axis] - kernel_size) // stride + 1 for axis in (1, 2))
    expected = np.zeros((batch, out_h, out_w, out_channels))
    for i in range(kernel_size):
        for j in range(kernel_size):
            window = padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            expected += np.einsum("nhwc,co->nhwo", window, kernel[i, j].astype(np.float64))
    if tile:
        conv = functools.partial(cpu_kernels.winograd_conv, tile=tile)
    else:
        conv = functools.partial(cpu_kernels.conv, stride=stride, padding=padding)
    ours = jax.jit(conv)(jnp.asarray(x), jnp.asarray(kernel))
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    tolerance = 2e-5 if tile == 4 else 1e-6
    print(f"\nlargest error / largest output: {np.abs(ours - expected).max() / np.abs(expected).max():.1e}")
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def float64_attention(qkv: np.ndarray, heads: int) -> np.ndarray:
    """softmax(q k^T / sqrt(head_dim)) v per head in numpy float64, from (N, T, 3C) to (N, T, C)."""
    batch, tokens, width = qkv.shape
    q, k, v = qkv.astype(np.float64).reshape(batch, tokens, 3, heads, -1).transpose(2, 0, 3, 1, 4)
    logits = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width // 3)


@pytest.mark.parametrize("batch, tokens, heads", [
    (2, 17, 2),  # one vector of keys and one more, all but one lane of it padding
    (1, 5, 1),  # fewer tokens than a block of rows and than a vector
    (3, 50, 3),  # 50 = 8 blocks of 6 rows and 2; three heads side by side
    (1, 32, 2),  # whole vectors of keys, no padding
])
def test_native_attention_matches_float64(batch, tokens, heads):
    """kdep_jax's C++ attention kernel against numpy float64, within a few times XLA's form's error, on logits spread
    over tens (weights from 1 down to exp(-87) and below: the exponential's whole range)."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(tokens * heads)
    qkv = (3 * rng.normal(size=(batch, tokens, 3 * heads * 64))).astype(np.float32)
    expected = float64_attention(qkv, heads)
    ours = jax.jit(cpu_kernels.attention, static_argnums=1)(jnp.asarray(qkv), heads)
    xla = jax.jit(layers._xla_attention, static_argnums=(1, 2))(jnp.asarray(qkv), heads, jnp.float32)
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    error, xla_error = np.abs(ours - expected).max(), np.abs(xla - expected).max()
    print(f"\nlargest error: kernel {error:.1e}, XLA {xla_error:.1e}, largest output {np.abs(expected).max():.1f}")
    assert error <= max(4 * xla_error, 1e-6 * np.abs(expected).max())


def test_attention_with_the_kernel_has_xlas_values_and_gradients(monkeypatch):
    """`layers.attention` on one device with the kernel on: the kernel in the program, XLA's form's values within
    float32 rounding, and its gradient (XLA's form's, computed again from qkv) the same."""
    qkv = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 3 * 128)), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(2, 20, 128)), jnp.float32)

    def value_and_gradient(qkv):
        out, vjp = jax.vjp(lambda x: layers.attention(x, 2, jnp.float32), qkv)
        return out, vjp(cotangent)[0]

    xla_out, xla_gradient = jax.jit(value_and_gradient)(qkv)
    monkeypatch.setattr(layers, "_native_attention", lambda: True)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    with_kernel = jax.jit(lambda x: value_and_gradient(x))  # a function of its own: traced again, not cached
    assert '"kdep_attention"' in with_kernel.lower(qkv).compile().as_text()
    out, gradient = with_kernel(qkv)
    np.testing.assert_allclose(out, xla_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gradient, xla_gradient, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows, depth, features", [
    (1, 5, 32),  # one row: a panel of rows all but one zeros
    (13, 40, 64),  # fewer rows than a panel (14 with AVX-512, 6 with AVX2); two blocks of 32 output features
    (29, 1600, 96),  # 1600 = two passes of 768 and one of 64, each pass's sums added to the last's
    (400, 64, 32),  # more rows than one task's block (28 panels): two blocks of rows, even in size
])
def test_native_dense_matches_float64(rows, depth, features):
    """kdep_jax's C++ Linear-layer product against numpy float64, within a few times XLA's product's error."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(rows + depth)
    x = rng.normal(size=(rows, depth)).astype(np.float32)
    kernel = rng.normal(size=(depth, features)).astype(np.float32)
    expected = x.astype(np.float64) @ kernel.astype(np.float64)
    ours = jax.jit(lambda x, w: cpu_kernels.dense(x, cpu_kernels.pack_dense_weights(w)))(x, kernel)
    xla = jax.jit(jnp.matmul)(x, kernel)
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    error, xla_error = np.abs(ours - expected).max(), np.abs(xla - expected).max()
    print(f"\nlargest error: kernel {error:.1e}, XLA {xla_error:.1e}, largest output {np.abs(expected).max():.1f}")
    assert error <= max(4 * xla_error, 1e-6 * np.abs(expected).max())


def test_dense_with_packed_kernels_has_xlas_values_and_gradients(monkeypatch):
    """A transformer's Linear layer (`layers.dense`) given its kernel packed (`with_packed_dense_kernels`, on where
    the kernel runs): kdep_jax's kernel in the program, XLA's values within float32 rounding and XLA's gradients.
    Without the packed kernel, or where the kernel is off, the variables and the program are XLA's alone."""
    module = layers.dense(64, jax.nn.initializers.lecun_normal(), jnp.float32, "fc")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 48)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 64)), jnp.float32)

    def value_and_gradients(variables, x):
        out, vjp = jax.vjp(lambda params, x: module.apply({**variables, "params": params}, x), variables["params"], x)
        return out, vjp(cotangent)

    monkeypatch.setattr(layers, "_native_dense", lambda: False)
    assert layers.with_packed_dense_kernels(variables) is variables
    xla_out, xla_gradients = jax.jit(value_and_gradients)(variables, x)
    monkeypatch.setattr(layers, "_native_dense", lambda: True)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    packed = layers.with_packed_dense_kernels(variables)
    assert packed[layers.PACKED_KERNELS]["kernel"].shape == (2, 48, 32)
    with_kernel = jax.jit(lambda v, x: value_and_gradients(v, x))  # a function of its own: traced again
    assert '"kdep_dense"' in with_kernel.lower(packed, x).compile().as_text()
    out, gradients = with_kernel(packed, x)
    np.testing.assert_allclose(out, xla_out, rtol=1e-5, atol=1e-5)
    for ours, xla in zip(jax.tree.leaves(gradients), jax.tree.leaves(xla_gradients)):
        np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=1e-5)


@pytest.fixture
def needs_amx():
    """Skips where the AMX kernel does not run: a CPU without AMX tiles for bfloat16, or kernels built without them."""
    from kdep_jax.models import cpu_kernels

    if not cpu_kernels.amx_runs_here():
        pytest.skip("the AMX kernel runs on CPUs with AMX tiles for bfloat16, built by a compiler that knows them")


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("batch, height, width, in_channels, out_channels, kernel_size, stride, pad", [
    (2, 9, 10, 32, 32, 3, 1, 1),  # a 3x3 conv: each output row computed 2 columns wider, those dropped
    (2, 10, 11, 64, 96, 3, 2, 1),  # stride 2: four phase planes; 96 channels, three blocks of 32
    (3, 7, 8, 64, 32, 1, 1, 0),  # a 1x1 conv with stride 1 reads x itself; 168 outputs, the last block partial
    (2, 14, 15, 32, 64, 1, 2, 0),  # a strided 1x1 conv: one plane of every other pixel
    (1, 11, 12, 32, 32, 7, 2, 3),  # a 7x7 kernel with stride 2
    (2, 13, 14, 64, 32, 3, 1, 0),  # no padding
    (9, 5, 5, 32, 64, 3, 1, 1),  # small images: several to a task
    (1, 40, 41, 256, 32, 1, 1, 0),  # large ones: bands of rows (2), x read itself
    (1, 40, 41, 256, 32, 3, 1, 1),  # the same, copied into a plane (2 bands)
    (1, 40, 41, 256, 32, 3, 2, 1),  # four phase planes (3 bands)
])
@pytest.mark.parametrize("form", ["plain", "of_activation", "to_block_end"])
def test_amx_conv_matches_float64(batch, height, width, in_channels, out_channels, kernel_size, stride, pad, form):
    """kdep_jax's bfloat16 conv on the AMX tiles against numpy float64 over the same bfloat16 values: float32 sums
    rounded to bfloat16 once. Of an activation, the input is relu(x * scale + shift), rounded to bfloat16 as XLA
    rounds (`layers._activation`), a NaN in x giving NaNs where it is read; to a block's end, the output is
    relu(sums * scale + shift + residual)."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(batch + height + kernel_size)
    x = jnp.asarray(rng.normal(size=(batch, height, width, in_channels)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)), jnp.bfloat16)
    padding = ((pad, pad), (pad, pad))
    activation = None
    if form != "plain":
        x = x.at[0, 1, 2, 3].set(jnp.nan)
        activation = tuple(jnp.asarray(rng.normal(size=in_channels), jnp.float32) for _ in range(2))
    read = x if activation is None else layers._activation(x, *activation, jnp.bfloat16)
    expected = torch.nn.functional.conv2d(  # float64
        torch.from_numpy(np.asarray(read.astype(jnp.float32), np.float64)).permute(0, 3, 1, 2),
        torch.from_numpy(np.asarray(kernel.astype(jnp.float32), np.float64)).permute(3, 2, 0, 1),
        stride=stride, padding=pad).permute(0, 2, 3, 1).numpy()
    block_end = None
    if form == "to_block_end":
        scale, shift = (rng.normal(size=out_channels).astype(np.float32) for _ in range(2))
        residual = jnp.asarray(rng.normal(size=expected.shape), jnp.bfloat16)
        block_end = (jnp.asarray(scale), jnp.asarray(shift), residual, True)
        expected = np.maximum(expected * scale + shift + np.asarray(residual.astype(jnp.float32), np.float64), 0)
    ours = jax.jit(lambda x, w: cpu_kernels.amx_conv(x, w, stride, padding, activation, block_end))(x, kernel)
    assert ours.shape == expected.shape and ours.dtype == jnp.bfloat16
    ours = np.asarray(ours.astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    finite = np.isfinite(expected)
    assert finite.sum() > expected.size // 2
    largest = np.abs(expected[finite]).max()
    assert (np.abs(ours[finite] - expected[finite]) <= 2**-8 * np.abs(expected[finite]) + 1e-5 * largest).all()


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("batch, height, width, in_channels, out_channels, kernel_size, stride, pad", [
    (2, 9, 10, 32, 64, 3, 1, 1),  # a 3x3 conv: the grid's 2 extra columns of each row read zero gradients
    (3, 10, 11, 64, 32, 3, 2, 1),  # stride 2: four phase planes
    (2, 7, 8, 32, 96, 1, 1, 0),  # a 1x1 conv; 56 outputs, the last block partial; three blocks of 32
    (2, 14, 15, 64, 32, 1, 2, 0),  # a strided 1x1 conv: one plane of every other pixel
    (2, 13, 14, 32, 32, 3, 1, 0),  # no padding
    (100, 7, 7, 64, 64, 3, 1, 1),  # ResNet's 7 px: two chunks of 84 images and 16, added in float64
])
def test_amx_conv_weight_gradient_matches_float64(batch, height, width, in_channels, out_channels, kernel_size,
                                                  stride, pad):
    """The weight gradient on the AMX tiles against numpy float64 over the same bfloat16 values: bfloat16 products
    are exact in float32, so only the float32 sums over each chunk's outputs round."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(batch + height + kernel_size)
    x = jnp.asarray(rng.normal(size=(batch, height, width, in_channels)), jnp.bfloat16)
    out_height, out_width = ((size + 2 * pad - kernel_size) // stride + 1 for size in (height, width))
    grad = jnp.asarray(rng.normal(size=(batch, out_height, out_width, out_channels)), jnp.bfloat16)
    padded = np.pad(np.asarray(x.astype(jnp.float32), np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    expected = np.zeros((kernel_size, kernel_size, in_channels, out_channels))
    for i in range(kernel_size):
        for j in range(kernel_size):
            read = padded[:, i:i + stride * (out_height - 1) + 1:stride, j:j + stride * (out_width - 1) + 1:stride]
            expected[i, j] = np.einsum("nhwc,nhwo->co", read, np.asarray(grad.astype(jnp.float32), np.float64))
    ours = jax.jit(lambda x, g: cpu_kernels.amx_conv_weight_gradient(x, g, kernel_size, stride, ((pad, pad),) * 2))(
        x, grad)
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max() * np.sqrt(batch))


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("batch, height, width, in_channels, out_channels, kernel_size, stride, pad", [
    (2, 20, 21, 3, 64, 7, 2, 3),  # a ResNet's stem: rows of 7 taps' 21 values; 11 columns, one partial block
    (3, 9, 10, 3, 32, 3, 2, 1),  # MobileNetV2's stem: rows of 9 values
    (2, 11, 12, 16, 64, 3, 1, 1),  # rows of 48 values: two blocks of 32
    (1, 70, 75, 3, 32, 7, 2, 3),  # 38 columns: blocks of 32 and 6
    (1, 300, 10, 3, 32, 3, 1, 1),  # bands of 254 output rows, the second of 46
    (2, 6, 7, 5, 32, 5, 3, 0),  # stride 3, no padding
])
def test_amx_patch_conv_matches_float64(batch, height, width, in_channels, out_channels, kernel_size, stride, pad):
    """A conv of few input channels (a stem's) on the AMX tiles, by its patches (`cpu_kernels.amx_patch_conv`), and
    its weight gradient, against torch in float64 over the same bfloat16 values: bfloat16 products are exact in
    float32, so only the float32 sums round (the forward pass's over an output's patch, the weight gradient's over
    a band of outputs, added in float64)."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(batch + height + kernel_size)
    x = jnp.asarray(rng.normal(size=(batch, height, width, in_channels)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, in_channels, out_channels)), jnp.bfloat16)
    padding = ((pad, pad), (pad, pad))
    x64, kernel64 = (torch.from_numpy(np.asarray(v.astype(jnp.float32), np.float64)) for v in (x, kernel))
    kernel64.requires_grad_(True)
    expected = torch.nn.functional.conv2d(x64.permute(0, 3, 1, 2), kernel64.permute(3, 2, 0, 1), stride=stride,
                                          padding=pad).permute(0, 2, 3, 1)
    grad = jnp.asarray(rng.normal(size=expected.shape), jnp.bfloat16)
    expected.backward(torch.from_numpy(np.asarray(grad.astype(jnp.float32), np.float64)))
    expected, expected_gradient = expected.detach().numpy(), kernel64.grad.numpy()
    ours, gradient = jax.jit(lambda x, w, g: (
        cpu_kernels.amx_patch_conv(x, w, stride, padding),
        cpu_kernels.amx_patch_conv_weight_gradient(x, g, kernel_size, stride, padding)))(x, kernel, grad)
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert gradient.shape == expected_gradient.shape and gradient.dtype == jnp.float32
    np.testing.assert_allclose(gradient, expected_gradient, rtol=0, atol=1e-6 * np.abs(expected_gradient).max())


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("height, width", [(20, 21), (300, 37)])  # 300: two bands of pooled rows, of 53 and 22
def test_amx_patch_conv_max_pool_is_the_pool_of_its_sums(height, width):
    """The stem's conv and max-pool in one kernel (eval mode): bit for bit the max-pool kernel's pool of the patch
    conv's sums, a NaN in x giving NaNs where it is read."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(height)
    x = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.bfloat16).at[1, 5, 6, 1].set(jnp.nan)
    kernel = jnp.asarray(rng.normal(size=(7, 7, 3, 64)), jnp.bfloat16)
    padding = ((3, 3), (3, 3))
    fused, sums = jax.jit(lambda x, w: (cpu_kernels.amx_patch_conv(x, w, 2, padding, max_pool=(3, 2, 1)),
                                        cpu_kernels.amx_patch_conv(x, w, 2, padding)))(x, kernel)
    expected = cpu_kernels.max_pool(sums, 3, 2, ((1, 1), (1, 1)))[0]
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_array_equal(fused, expected)


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("batch, height, width", [
    (3, 20, 21),  # 10 x 11 sums an image: chunks of 256 shared by images
    (1, 300, 37),  # two bands of pooled rows, their conv rows' chunks shared
    (2, 1800, 9),  # 900 x 5 sums an image: three bands
])
def test_amx_patch_conv_pool_statistics_are_the_kernels(batch, height, width):
    """The stem's conv, max-pool and batch statistics in one kernel (training): bit for bit the max-pool kernel's
    pool and taps of the patch conv's sums and the batch-moments kernel's statistics of them; and the gradient of its
    kernel, through the pooled outputs and the statistics, that of those kernels' gradients within the rounding of the
    sums' gradient to bfloat16 (in another order)."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(height)
    x = jnp.asarray(rng.normal(size=(batch, height, width, 3)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(7, 7, 3, 64)), jnp.bfloat16)
    padding, pool = ((3, 3), (3, 3)), (3, 2, 1)
    fused, sums = jax.jit(lambda x, w: (cpu_kernels.amx_patch_conv_pool_statistics(x, w, 2, padding, pool),
                                        cpu_kernels.amx_patch_conv(x, w, 2, padding)))(x, kernel)
    for ours, expected in zip(fused, (*cpu_kernels.max_pool(sums, 3, 2, ((1, 1), (1, 1))),
                                      *cpu_kernels.batch_moments(sums))):
        np.testing.assert_array_equal(ours, expected)
    weights = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in (fused[0].shape, (64,), (64,))]

    def loss(statistics, kernel):
        pooled, mean, var = statistics(x, kernel, 2, padding, pool)
        return jnp.sum(pooled * weights[0]) + 1e3 * jnp.sum(mean * weights[1] + var * weights[2])

    ours, expected = (jax.jit(jax.grad(functools.partial(loss, statistics)))(kernel)
                      for statistics in (layers.pooled_conv_statistics, layers._pooled_statistics))
    assert relative_error(ours, expected) < 1e-3


@pytest.mark.usefixtures("needs_amx")
def test_bfloat16_resnet_on_amx_tiles_has_xlas_features(monkeypatch):
    """A bfloat16 ResNet on a CPU with AMX tiles, in eval mode: its convs' forward passes on the tiles (a stem's, of 3
    channels, by its patches, with the pool), each block's last conv with the block's end; the features of XLA's
    bfloat16 model within bfloat16's rounding, and the float32 model's within a few times that (each conv form's
    gradients: below)."""
    model = create_model("resnet18", num_classes=None, dtype=jnp.bfloat16)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)

    def features(variables, images):
        return model.apply(variables, images, train=False)[1]["pre_relu"]

    monkeypatch.setattr(jax, "device_count", lambda: 1)
    on_tiles = jax.jit(lambda v, x: features(v, x))
    program = on_tiles.lower(variables, images).compile().as_text()
    assert '"kdep_amx_conv_of_activation_to_block_end"' in program and '"kdep_amx_conv"' in program
    assert '"kdep_amx_patch_conv_max_pool"' in program  # the stem's conv and pool
    ours = on_tiles(variables, images)
    monkeypatch.setattr(layers, "_amx_conv", lambda: False)
    xla = jax.jit(lambda v, x: features(v, x))(variables, images)
    float32 = create_model("resnet18", num_classes=None, dtype=jnp.float32).apply(variables, images, train=False)
    float32 = float32[1]["pre_relu"]
    assert relative_error(ours, xla) < 2e-2
    assert relative_error(ours, float32) < 3 * max(relative_error(xla, float32), 1e-2)


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("train", [False, True])
def test_bfloat16_resnet_stem_pools_before_its_activation_with_the_same_values(train, monkeypatch):
    """On the AMX tiles a ResNet's stem pools its conv's float32 sums before bn1 and its ReLU (`ResNet.stem`), the
    channels whose BatchNorm scale is negative by the conv with their kernel negated: the features, and in training
    the batch statistics, bit for bit those of the stem in torch's order, with scales of both signs. In training
    each window's gradient goes to its largest sum rather than to the first activation of the bfloat16 maximum: the
    parameters' gradients as close to float32 training's as torch's order gives them (by their norm: on six draws
    ResNet-18's conv1 gradient 0.107-0.128 from float32's against 0.109-0.130)."""
    model = create_model("resnet18", num_classes=None, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    scale = rng.normal(size=64)
    assert (scale < 0).any() and (scale > 0).any()
    variables["params"]["bn1"].update(scale=jnp.asarray(scale, jnp.float32),
                                      bias=jnp.asarray(rng.normal(size=64), jnp.float32))
    variables["batch_stats"]["bn1"].update(mean=jnp.asarray(rng.normal(size=64), jnp.float32),
                                           var=jnp.asarray(rng.uniform(0.5, 1.5, size=64), jnp.float32))
    weights = jnp.asarray(rng.normal(size=(4, 8, 8, 64)), jnp.float32)

    def stage1(model, params):
        (_, features), updates = model.apply({**variables, "params": params}, images, train=train,
                                             mutable=["batch_stats"])
        return jnp.sum(features["stage1"] * weights), (features["stage1"], updates)

    def compiled(model):  # traced anew: pools_before_activation is read as it is traced
        step = jax.grad(functools.partial(stage1, model), has_aux=True) if train else (
            lambda params: (None, stage1(model, params)[1]))
        return jax.jit(step).lower(variables["params"]).compile()

    def stem_relu_size(model):  # the stem's ReLU is the first one traced: of the pooled values, or of the conv's
        sizes = []
        monkeypatch.setattr(resnet, "relu", lambda x: sizes.append(x.shape[1]) or layers.relu(x))
        step = compiled(model)
        monkeypatch.setattr(resnet, "relu", layers.relu)
        return step, sizes[0]

    monkeypatch.setattr(jax, "device_count", lambda: 1)
    pooled_first, size = stem_relu_size(model)
    assert size == 8
    gradients, (ours, ours_statistics) = pooled_first(variables["params"])
    monkeypatch.setattr(resnet, "pools_before_activation", lambda x, k: False)
    torch_order, size = stem_relu_size(model)
    assert size == 16
    expected_gradients, (expected, expected_statistics) = torch_order(variables["params"])
    assert np.count_nonzero(expected) > expected.size // 4
    np.testing.assert_array_equal(ours, expected)
    jax.tree.map(np.testing.assert_array_equal, ours_statistics, expected_statistics)
    if train:
        float32_gradients, _ = compiled(create_model("resnet18", num_classes=None))(variables["params"])
        for layer, name in (("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias")):
            reference = np.asarray(float32_gradients[layer][name], np.float64)
            ours_error, expected_error = (np.linalg.norm(np.asarray(tree[layer][name], np.float64) - reference)
                                          / np.linalg.norm(reference) for tree in (gradients, expected_gradients))
            assert ours_error < 1.1 * expected_error, (layer, name, ours_error, expected_error)


@pytest.mark.usefixtures("needs_amx")
@pytest.mark.parametrize("kernel_size, stride, form", [(3, 1, "conv"), (3, 2, "conv"), (1, 1, "conv"), (1, 2, "conv"),
                                                       (3, 1, "of_activation"), (1, 1, "of_activation"),
                                                       (3, 1, "to_block_end"), (1, 1, "to_block_end"),
                                                       (1, 1, "to_block_end, residual mapped"), (7, 2, "stem")])
def test_bfloat16_convs_on_amx_tiles_match_xlas(kernel_size, stride, form, monkeypatch):
    """conv2d's bfloat16 convs (a stem's of 3 channels by its patches), and ConvOfActivation's (with a ResNet block's
    end too, its residual through a BatchNorm's map or not), on the AMX tiles, with their gradients: XLA's bfloat16
    values and gradients within bfloat16's rounding. The block's end is 10 from its ReLU's edge, which the two sums'
    rounding would move otherwise."""
    rng = np.random.default_rng(kernel_size + stride)
    x = jnp.asarray(rng.normal(size=(2, 8, 9, 3 if form == "stem" else 32)), jnp.bfloat16)
    scale, shift, end_scale = (jnp.asarray(rng.normal(size=32 if i < 2 else 64), jnp.float32) for i in range(3))
    end_shift = jnp.asarray(np.resize([10.0, -10.0], 64), jnp.float32)
    residual = jnp.asarray(rng.normal(size=(2, 8, 9, 64)), jnp.bfloat16)
    residual_map = tuple(jnp.asarray(rng.normal(size=64), jnp.float32) for _ in range(2))
    if form in ("conv", "stem"):
        module, arguments = conv2d(64, kernel_size, stride, dtype=jnp.bfloat16), (x,)
    else:
        module = layers.ConvOfActivation(64, kernel_size, stride, dtype=jnp.bfloat16)
        arguments = (x, scale, shift) + ((end_scale, end_shift, residual) if "block_end" in form else ())
        arguments += residual_map if "mapped" in form else ()

    def apply(variables, *arguments):
        if "block_end" not in form:
            return module.apply(variables, *arguments)
        return module.apply(variables, *arguments[:3], block_end=(*arguments[3:6], True),
                            residual_map=arguments[6:] or None)

    variables = module.init(jax.random.key(0), *arguments[:3])
    cotangent = jnp.asarray(rng.normal(size=jax.eval_shape(apply, variables, *arguments).shape), jnp.float32)

    def value_and_gradients(variables, *arguments):
        out, vjp = jax.vjp(lambda *a: apply(*a).astype(jnp.float32), variables, *arguments)
        return out, vjp(cotangent)

    monkeypatch.setattr(jax, "device_count", lambda: 1)
    on_tiles = jax.jit(lambda *a: value_and_gradients(*a))  # functions of their own: each traced anew
    compiled = on_tiles.lower(variables, *arguments).compile().as_text()
    assert ("kdep_amx_patch_conv" if form == "stem" else "kdep_amx_conv") in compiled
    assert kernel_size == 1 or re.search(r'custom_call_target="kdep_\w*weight_gradient"', compiled)
    if form == "conv" and kernel_size == 3:  # the input gradient on the tiles too, at stride 2 of the dilated one
        assert compiled.count('custom_call_target="kdep_amx_conv"') == 2
    out, gradients = on_tiles(variables, *arguments)
    monkeypatch.setattr(layers, "_amx_conv", lambda: False)
    xla = jax.jit(lambda *a: value_and_gradients(*a))
    assert "kdep_amx" not in xla.lower(variables, *arguments).compile().as_text()
    xla_out, xla_gradients = xla(variables, *arguments)
    assert relative_error(out, xla_out) < 1e-2
    for leaf, xla_leaf in zip(jax.tree.leaves(gradients), jax.tree.leaves(xla_gradients)):
        assert leaf.dtype == xla_leaf.dtype
        assert relative_error(leaf, xla_leaf) < 1e-2


@pytest.mark.parametrize("depthwise, batch, height, width, in_channels, out_channels, kernel_size, stride, padding", [
    (False, 2, 8, 9, 64, 40, 3, 2, ((1, 1), (1, 1))),  # a ResNet's strided conv: two blocks of 32 input channels
    (False, 1, 5, 31, 32, 24, 3, 2, ((1, 1), (1, 1))),  # 31 columns: phases of 16 and 15, each in blocks of 14
    (False, 2, 9, 10, 32, 8, 3, 2, ((0, 1), (0, 1))),  # TensorFlow's "SAME" padding
    (False, 1, 10, 11, 32, 5, 5, 3, ((2, 1), (1, 2))),  # stride 3, uneven padding
    (False, 3, 7, 7, 32, 16, 3, 1, ((1, 1), (1, 1))),  # stride 1
    (False, 1, 30, 9, 32, 8, 3, 1, ((1, 1), (1, 1))),  # bands of 13 rows of dx, the last of 4
    (False, 1, 1, 1, 32, 8, 3, 2, ((1, 1), (1, 1))),  # one pixel
    (True, 2, 9, 7, 37, 37, 3, 1, ((1, 1), (1, 1))),  # 37 channels: two blocks of 16 side by side and a tail of 5
    (True, 1, 8, 9, 144, 144, 3, 2, ((1, 1), (1, 1))),  # MobileNetV2's: 8 blocks of 16 side by side and one more
    (True, 2, 9, 10, 96, 96, 3, 2, ((0, 1), (0, 1))),  # 96 = 4 + 2 blocks of 16; TensorFlow's "SAME" padding
    (True, 1, 50, 10, 16, 16, 3, 1, ((1, 1), (1, 1))),  # 500 pixels of dx: bands of 45 rows, the second of 5
    (True, 1, 11, 10, 48, 48, 5, 2, ((2, 2), (2, 2))), (True, 2, 6, 8, 20, 20, 5, 1, ((1, 3), (2, 2))),  # 5x5
    (True, 1, 9, 9, 7, 7, 7, 1, ((3, 3), (3, 3))),  # ConvNeXt's 7x7 (49 taps)
    (True, 2, 7, 7, 17, 17, 3, 3, ((1, 0), (2, 1))),  # stride 3, uneven padding
    (True, 1, 1, 1, 32, 32, 3, 1, ((1, 1), (1, 1))),  # one pixel: only the centre tap reaches it
    (True, 1, 4, 4, 16, 16, 3, 2, ((0, 0), (0, 0))),  # no padding: one output pixel; no tap reaches dx's last row
])
def test_native_input_gradients_match_float64(depthwise, batch, height, width, in_channels, out_channels, kernel_size,
                                              stride, padding):
    """kdep_jax's C++ kernels for the input gradient of a dense conv and of a depthwise one against numpy float64:
    each tap's products of the output gradient with the kernel (per channel, depthwise), added at the tap's strided
    positions of the zero-padded input, the padding cut off."""
    from kdep_jax.models import cpu_kernels

    rng = np.random.default_rng(width * in_channels + stride)
    kernel = rng.normal(size=(kernel_size, kernel_size, 1 if depthwise else in_channels, out_channels))
    kernel = kernel.astype(np.float32)
    (top, bottom), (left, right) = padding
    out_h, out_w = ((size + before + after - kernel_size) // stride + 1
                    for size, (before, after) in zip((height, width), padding))
    grad = rng.normal(size=(batch, out_h, out_w, out_channels)).astype(np.float32)
    expected = np.zeros((batch, height + top + bottom, width + left + right, in_channels))
    for i in range(kernel_size):
        for j in range(kernel_size):
            expected[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride] += np.einsum(
                "nhwc,c->nhwc" if depthwise else "nhwo,co->nhwc", grad.astype(np.float64),
                kernel[i, j, 0] if depthwise else kernel[i, j].astype(np.float64))
    expected = expected[:, top:top + height, left:left + width]
    gradient = cpu_kernels.depthwise_input_gradient if depthwise else cpu_kernels.conv_input_gradient
    ours = jax.jit(functools.partial(gradient, input_shape=(batch, height, width, in_channels), stride=stride,
                                     padding=padding))(jnp.asarray(grad), jnp.asarray(kernel))
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, stride", [
    (3, 64, 7, 2), (3, 40, 3, 2),  # stems: 64 output channels take the conv kernel, 40 do not
    (64, 64, 3, 1),  # a ResNet's 3x3 conv with stride 1: every pass from kdep_jax's kernels (Winograd where on)
    (64, 128, 3, 2),  # stride 2: the direct kernels
    (32, 72, 3, 1),  # 72 output channels: XLA's forward pass; 72 read by the input gradient: its direct kernel
    (48, 32, 3, 1),  # 48 input channels: XLA's input gradient, the forward pass by Winograd where on
    (40, 32, 3, 2),  # 40 input channels: XLA's input gradient
])
@pytest.mark.parametrize("native, winograd_tile", [(True, 4), (True, 2), (True, None), (False, None)])
def test_conv2d_equals_xla_with_and_without_the_native_kernels(in_channels, out_channels, kernel_size, stride, native,
                                                               winograd_tile, monkeypatch):
    """conv2d on one CPU device with kdep_jax's C++ kernels on (Winograd's F(4x4, 3x3), F(2x2, 3x3) or none) and
    off: the value and both gradients equal XLA's plain convolution's to float32 rounding; each kernel runs exactly
    where `layers._flax_conv` says."""
    winograd = winograd_tile is not None
    monkeypatch.setattr(layers, "_native_conv", lambda: native)
    monkeypatch.setattr(layers, "_winograd_conv", lambda: winograd)
    monkeypatch.setattr(layers, "_winograd_4x4_conv", lambda: winograd_tile == 4)
    monkeypatch.setattr(layers, "_WINOGRAD_4X4_MIN_SIZE", 15)  # x is 15 x 16 px
    monkeypatch.setattr(layers, "_winograd_weight_gradient", lambda: winograd)
    monkeypatch.setattr(layers, "_native_conv_weight_gradient", lambda: native)
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite's process has 4 CPU devices
    rng = np.random.default_rng(in_channels)
    x = jnp.asarray(rng.normal(size=(4, 15, 16, in_channels)), jnp.float32)
    conv = conv2d(out_channels, kernel_size, stride)
    params = conv.init(jax.random.key(0), x)
    cotangent = jnp.asarray(rng.normal(size=conv.apply(params, x).shape), jnp.float32)
    pad = kernel_size // 2

    def plain(params, x):
        return jax.lax.conv_general_dilated(x, params["params"]["kernel"], (stride, stride), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    grads = jax.jit(lambda f, p, x: jax.vjp(f, p, x)[1](cotangent), static_argnums=0)
    forward = jax.jit(conv.apply).lower(params, x).compile().as_text()
    backward = grads.lower(conv.apply, params, x).compile().as_text()
    by_winograd = winograd and kernel_size == 3 and stride == 1
    winograd_conv = '"kdep_winograd_conv_4x4"' if winograd_tile == 4 else '"kdep_winograd_conv"'
    forward_winograd = native and by_winograd and out_channels % 32 == 0 and in_channels % 16 == 0
    assert (winograd_conv in forward) == forward_winograd
    assert ('"kdep_conv"' in forward) == (native and out_channels % 32 == 0 and not forward_winograd)
    input_gradient_winograd = native and by_winograd and in_channels % 32 == 0 and out_channels % 16 == 0
    assert (winograd_conv in backward) == input_gradient_winograd
    assert ('"kdep_conv_input_gradient"' in backward) == (native and in_channels % 32 == 0
                                                         and not input_gradient_winograd)
    weight_gradient_winograd = native and by_winograd and in_channels % 16 == 0 and out_channels % 16 == 0
    assert ('"kdep_winograd_weight_gradient"' in backward) == weight_gradient_winograd  # 15 x 16 px: at least 14
    assert ('"kdep_conv_weight_gradient"' in backward) == (native and not weight_gradient_winograd)
    tolerance = 2e-5 if winograd_tile == 4 else 1e-5  # F(4x4, 3x3)'s rounding: test_native_conv_matches_float64
    expected = plain(params, x)
    value_atol = tolerance * np.abs(expected).max() if winograd_tile == 4 else tolerance
    np.testing.assert_allclose(conv.apply(params, x), expected, rtol=tolerance, atol=value_atol)
    for ours, reference in zip(jax.tree.leaves(grads(conv.apply, params, x)), jax.tree.leaves(grads(plain, params, x))):
        np.testing.assert_allclose(ours, reference, rtol=tolerance, atol=tolerance * np.abs(reference).max())


def test_bfloat16_conv_on_a_gpu_reads_an_rgb_input_as_8_channels(monkeypatch):
    """conv2d's bfloat16 convs on a GPU (`layers.channel_padded_conv`): a 3-channel input and the kernel are read
    as 8 channels; the value and the kernel's gradient are the 3-channel conv's (torch in float64) to bfloat16
    rounding."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 15, 16, 3)), jnp.bfloat16)
    conv = conv2d(16, 7, 2, dtype=jnp.bfloat16)
    params = conv.init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (7, 7, 3, 16)
    assert "tensor<7x7x8x16xbf16>" in jax.jit(conv.apply).lower(params, x).as_text()
    value, vjp = jax.vjp(conv.apply, params, x)
    cotangent = jnp.asarray(rng.normal(size=value.shape), jnp.bfloat16)
    kernel_gradient = vjp(cotangent)[0]["params"]["kernel"]

    def as_torch(array, *order):
        return torch.tensor(np.asarray(array, np.float64)).permute(*order)

    kernel = as_torch(params["params"]["kernel"].astype(jnp.bfloat16), 3, 2, 0, 1).requires_grad_()
    expected = torch.nn.functional.conv2d(as_torch(x, 0, 3, 1, 2), kernel, stride=2, padding=3)
    (expected * as_torch(cotangent, 0, 3, 1, 2)).sum().backward()
    expected = expected.detach().permute(0, 2, 3, 1).numpy()
    expected_gradient = kernel.grad.permute(2, 3, 1, 0).numpy()
    np.testing.assert_allclose(np.asarray(value, np.float64), expected, atol=1e-2 * np.abs(expected).max())
    np.testing.assert_allclose(kernel_gradient, expected_gradient, atol=1e-2 * np.abs(expected_gradient).max())


@pytest.mark.parametrize("native", [True, False])
def test_conv_of_activation_equals_batchnorm_relu_conv(native, monkeypatch):
    """ConvOfActivation (a conv of BatchNorm's affine map and a ReLU, ResNet's blocks) against BatchNorm, relu and
    conv2d applied one after the other: the same parameters, the same value, and gradients (of the BatchNorm's and
    the conv's parameters and of x) equal to float32 rounding, on one CPU device with kdep_jax's C++ kernels on and
    off. With them, the weight gradient computes the activation from x, and the backward pass keeps x and not the
    activation too."""
    from kdep_jax.models.layers import ConvOfActivation

    for switch in ("_native_conv", "_winograd_conv", "_winograd_weight_gradient", "_native_conv_weight_gradient",
                   "_weight_gradient_of_activation"):
        monkeypatch.setattr(layers, switch, lambda: native)
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite's process has 4 CPU devices
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 14, 15, 16)), jnp.float32)
    batch_norm, fused, conv = BatchNorm(), ConvOfActivation(32, 3), conv2d(32, 3)
    norm_variables = batch_norm.init(jax.random.key(1), x, train=False)
    norm_variables = {"params": jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), jnp.float32),
                                             norm_variables["params"]), "batch_stats": norm_variables["batch_stats"]}
    scale, shift = batch_norm.apply(norm_variables, x, train=False, affine=True)
    kernel = fused.init(jax.random.key(2), x, scale, shift)
    assert jax.tree.map(jnp.shape, kernel) == jax.tree.map(jnp.shape, conv.init(jax.random.key(2), x))
    np.testing.assert_array_equal(kernel["params"]["kernel"], conv.init(jax.random.key(2), x)["params"]["kernel"])

    def apply(norm_params, conv_params, x, separately):
        variables = {"params": norm_params, "batch_stats": norm_variables["batch_stats"]}
        if separately:
            y, _ = batch_norm.apply(variables, x, train=True, mutable=["batch_stats"])
            return conv.apply(conv_params, layers.relu(y))
        (scale, shift), _ = batch_norm.apply(variables, x, train=True, affine=True, mutable=["batch_stats"])
        return fused.apply(conv_params, x, scale, shift)

    arguments = (norm_variables["params"], kernel, x)
    cotangent = jnp.asarray(rng.normal(size=(3, 14, 15, 32)), jnp.float32)
    results = {}
    for separately in (True, False):
        out, pullback = jax.vjp(functools.partial(apply, separately=separately), *arguments)
        results[separately] = out, pullback(cotangent)
    np.testing.assert_allclose(results[False][0], results[True][0], rtol=1e-5, atol=1e-5)
    for ours, reference in zip(jax.tree.leaves(results[False][1]), jax.tree.leaves(results[True][1])):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    backward = jax.jit(lambda c, *a: jax.vjp(lambda *a: apply(*a, False), *a)[1](c)).lower(cotangent, *arguments)
    assert ('"kdep_winograd_weight_gradient_of_activation"' in backward.compile().as_text()) == native
    _, pullback = jax.vjp(lambda x, s, b: fused.apply(kernel, x, s, b), x, scale, shift)
    kept = [leaf.shape for leaf in jax.tree.leaves(pullback) if getattr(leaf, "shape", None) == x.shape]
    assert len(kept) == 1 if native else len(kept) > 1  # x alone; or x, the activation and its ReLU's mask


def test_cpu_kernels_say_what_to_do_without_a_compiler(tmp_path, monkeypatch):
    """Without a C++ compiler kdep_jax warns, naming the fix, and keeps XLA's forms."""
    from kdep_jax.models import cpu_kernels

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KDEP_JAX_KERNEL_CACHE", str(tmp_path / "empty"))
    cpu_kernels.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="(?s)could not build.*install a C[+][+] compiler"):
            assert not cpu_kernels.available()
    finally:
        cpu_kernels.available.cache_clear()


def test_cpu_kernels_move_vectors_whole_where_the_compiler_knows_how(tmp_path):
    """g++ gets the flags that keep its tuning for some Intel CPUs from splitting the kernels' 64-byte vectors in
    halves (2.4x slower there); a compiler without them (older GCC, clang) is given none."""
    from kdep_jax.models import cpu_kernels

    assert cpu_kernels._accepted("g++", cpu_kernels._WHOLE_VECTOR_MOVES) == list(cpu_kernels._WHOLE_VECTOR_MOVES)
    older = tmp_path / "older-g++"
    older.write_text('#!/bin/sh\nfor a; do case "$a" in -mmove-max=*|-mstore-max=*) echo "g++: error: '
                     'unrecognized command-line option $a" >&2; exit 1;; esac; done\nexec g++ "$@"\n')
    older.chmod(0o755)
    assert cpu_kernels._accepted(str(older), cpu_kernels._WHOLE_VECTOR_MOVES) == []


@pytest.mark.parametrize("flags, runs", [("avx2 fma avx512f", True), ("avx2 fma", True), ("avx avx2", False),
                                         ("sse4_2 avx", False), ("", False)])
def test_cpu_kernels_run_on_avx512_and_on_avx2_with_fma(flags, runs, monkeypatch):
    """The kernels are built for AVX-512 and for AVX2 with FMA (each with its own register blocking); a CPU with
    neither (an older x86, or no x86 flags: an ARM) keeps XLA's forms."""
    from kdep_jax import xla_flags
    from kdep_jax.models import cpu_kernels

    monkeypatch.setattr(xla_flags, "cpu_features", lambda cpuinfo=None: frozenset(flags.split()))
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)  # built (tested above); the CPU decides
    cpu_kernels.runs_here.cache_clear()
    try:
        assert cpu_kernels.runs_here() == runs
    finally:
        cpu_kernels.runs_here.cache_clear()


@pytest.mark.parametrize("flags", ["avx2 fma avx512f avx512_bf16", "avx2 fma avx512f avx512_bf16 amx_tile",
                                   "avx2 fma avx512f avx512_bf16 amx_bf16"])
def test_the_amx_kernel_needs_amx_tiles_for_bfloat16(flags, monkeypatch):
    """`amx_conv` (a bfloat16 conv on the AMX tiles) is off on a CPU without both AMX flags, AVX-512 or not."""
    from kdep_jax import xla_flags
    from kdep_jax.models import cpu_kernels

    monkeypatch.setattr(xla_flags, "cpu_features", lambda cpuinfo=None: frozenset(flags.split()))
    cpu_kernels.amx_runs_here.cache_clear()
    try:
        assert not cpu_kernels.amx_runs_here()
    finally:
        cpu_kernels.amx_runs_here.cache_clear()


# Every C++ kernel on small shapes that leave partial blocks of pixels, channels and tiles; run by a fresh process
# with the kernels' library built by $CXX into $KDEP_JAX_KERNEL_CACHE, the outputs saved to the file argv[1].
_KERNEL_OUTPUTS = """
import sys
import jax
import numpy as np
from kdep_jax.models import cpu_kernels as k

rng = np.random.default_rng(0)
def r(*shape):
    return jax.numpy.asarray(rng.normal(size=shape).astype(np.float32))
same, stem = ((1, 1), (1, 1)), ((3, 3), (3, 3))
x, w, dy, x48 = r(2, 9, 11, 32), r(3, 3, 32, 64), r(2, 9, 11, 64), r(2, 9, 11, 48)
image, stem_w, stem_dy = r(2, 20, 19, 3), r(7, 7, 3, 32), r(2, 10, 10, 32)
dw_x, dw_w, dw_dy, dw_dy2 = r(2, 12, 13, 40), r(5, 5, 1, 40), r(2, 12, 13, 40), r(2, 6, 7, 40)
pooled, taps = k.max_pool(dw_x, 3, 2, same)
outputs = {
    "conv": k.conv(x, w, 1, same), "conv_stride_2": k.conv(x, w, 2, same), "stem": k.conv(image, stem_w, 2, stem),
    "input_gradient": k.conv_input_gradient(dy, w, x.shape, 1, same),
    "input_gradient_stride_2": k.conv_input_gradient(dy[:, ::2, ::2], w, x.shape, 2, same),
    "weight_gradient": k.conv_weight_gradient(x, x48, 3, 1, same),
    "stem_weight_gradient": k.conv_weight_gradient(image, stem_dy, 7, 2, stem),
    "winograd_2": k.winograd_conv(x, w, 2), "winograd_4": k.winograd_conv(x, w, 4),
    "winograd_weight_gradient": k.winograd_weight_gradient(x, x48),
    "winograd_weight_gradient_of_activation": k.winograd_weight_gradient(x, x48, (r(32), r(32))),
    "depthwise_weight_gradient": k.depthwise_weight_gradient(dw_x, dw_dy, 3, 1, same),
    "depthwise_weight_gradient_5x5_stride_2": k.depthwise_weight_gradient(dw_x, dw_dy2, 5, 2, ((2, 2), (2, 2))),
    "depthwise_input_gradient": k.depthwise_input_gradient(dw_dy, dw_w[1:4, 1:4], dw_x.shape, 1, same),
    "depthwise_input_gradient_5x5_stride_2": k.depthwise_input_gradient(dw_dy2, dw_w, dw_x.shape, 2, ((2, 2), (2, 2))),
    "max_pool": pooled, "max_pool_taps": taps, "max_pool_gradient": k.max_pool_gradient(taps, r(*pooled.shape),
                                                                                      dw_x.shape, 3, 2, same),
}
np.savez(sys.argv[1], **{name: np.asarray(value) for name, value in outputs.items()})
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AVX2 and AVX-512 are x86 instruction sets")
def test_cpu_kernels_built_for_avx2_equal_this_cpus_build_and_are_built_once(tmp_path, monkeypatch):
    """The kernels keep fewer sums in registers on CPUs without AVX-512 (`kSumLanes`, `kSumRows` in
    cpu_kernels.cc); built here without AVX-512 (`-mno-avx512f` after `-march=native`: what an AVX2-only CPU
    builds), every kernel gives what this CPU's build gives, to float32 rounding (each output's sum runs in the
    same order in both, so on these shapes bit for bit). On an AVX2-only CPU both builds are the same. This CPU's
    build is the suite's (in its kernel cache); the AVX2 one is built here, once per source, compiler, jaxlib and
    CPU: a second build finds it."""
    from kdep_jax.models import cpu_kernels

    avx2_compiler = tmp_path / "g++-avx2"
    avx2_compiler.write_text('#!/bin/sh\nexec g++ "$@" -mno-avx512f\n')
    avx2_compiler.chmod(0o755)
    outputs = {}
    for name, build in [("native", {}), ("avx2", {"CXX": str(avx2_compiler), "KDEP_JAX_KERNEL_CACHE": str(tmp_path)})]:
        env = {**os.environ, **build, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
        result = subprocess.run([sys.executable, "-c", _KERNEL_OUTPUTS, str(tmp_path / f"{name}.npz")], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = np.load(tmp_path / f"{name}.npz")
    (library,) = tmp_path.glob("*.so")
    built_at = library.stat().st_mtime_ns
    monkeypatch.setenv("CXX", str(avx2_compiler))
    assert cpu_kernels.build(tmp_path) == library and library.stat().st_mtime_ns == built_at
    assert sorted(path.name for path in tmp_path.glob("*.so*")) == [library.name]  # no temporary file left behind
    assert "zmm" not in subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True).stdout
    assert sorted(outputs["avx2"].files) == sorted(outputs["native"].files)
    for name in outputs["native"].files:
        native, avx2 = outputs["native"][name], outputs["avx2"][name]
        np.testing.assert_allclose(avx2, native, rtol=0, atol=1e-6 * np.abs(native).max(), err_msg=name)


def test_depthwise_weight_gradient_in_chunks_keeps_a_split_batch_on_its_devices(monkeypatch):
    """The weight gradient over chunks of images (AVX-512 CPUs), with the batch split over 4 devices: no device
    gathers the others' images (the compiled gradient's only collective is the sum over devices; kdep_jax's C++
    kernel, which would need the whole batch, is left out), and the gradients equal the unsplit ones to float32
    rounding."""
    monkeypatch.setattr(layers, "_chunk_weight_gradient", lambda: True)
    monkeypatch.setattr(layers, "_native_weight_gradient", lambda: True)
    rng = np.random.default_rng(0)
    x, cotangent = (jnp.asarray(rng.normal(size=(16, 6, 7, 5)), jnp.float32) for _ in range(2))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 5)), jnp.float32)
    grads = jax.jit(lambda x, k, ct: jax.vjp(lambda x, k: depthwise_conv(x, k, 1, True), x, k)[1](ct))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x_split, cotangent_split = jax.device_put(x, split), jax.device_put(cotangent, split)
    compiled = grads.lower(x_split, kernel, cotangent_split).compile().as_text()
    assert "all-reduce" in compiled and "all-gather" not in compiled and "all-to-all" not in compiled
    assert "kdep_depthwise_weight_gradient" not in compiled
    for on_split, on_one in zip(grads(x_split, kernel, cotangent_split), grads(x, kernel, cotangent)):
        np.testing.assert_allclose(on_split, on_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride, size", [(1, 5), (2, 6), (2, 7)])
@pytest.mark.parametrize("as_dot", [True, False])
def test_pointwise_conv_gradients_match_float64(stride, size, as_dot, monkeypatch):
    """conv2d's 1x1 conv on CPU, with the weight gradient as a dot (x86 CPUs with AVX2 and FMA) and as XLA's
    convolution (the others): the value and both gradients against numpy float64, strided and odd sizes included.
    A stride-1 conv's input gradient, a dot on every CPU, compiles to no convolution in a loop's body, where
    XLA:CPU would leave its own form a convolution (it makes it a dot only outside loops)."""
    monkeypatch.setattr(layers, "_pointwise_weight_gradient_as_dot", lambda: as_dot)
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size + 1, 6)).astype(np.float32)
    conv = conv2d(4, 1, stride)
    params = conv.init(jax.random.key(0), jnp.asarray(x))
    kernel = np.asarray(params["params"]["kernel"], np.float64)[0, 0]
    seen = x[:, ::stride, ::stride, :].astype(np.float64)
    cotangent = rng.normal(size=(*seen.shape[:3], 4)).astype(np.float32)
    out, backward = jax.vjp(conv.apply, params, jnp.asarray(x))
    grad_params, grad_x = backward(jnp.asarray(cotangent))

    def input_gradients_in_a_loop(params, cotangent):  # as the trainer's loop of steps runs them
        def add_input_gradient(_, total):
            return total + jax.vjp(lambda x: conv.apply(params, x), jnp.asarray(x))[1](cotangent)[0]
        return jax.lax.fori_loop(0, 2, add_input_gradient, jnp.zeros(x.shape))

    loop_program = jax.jit(input_gradients_in_a_loop).lower(params, jnp.asarray(cotangent)).compile().as_text()
    assert (" convolution(" in loop_program) == (stride > 1)
    expected_grad_x = np.zeros(x.shape)
    expected_grad_x[:, ::stride, ::stride, :] = cotangent @ kernel.T
    np.testing.assert_allclose(out, seen @ kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, expected_grad_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_params["params"]["kernel"][0, 0],
                               np.einsum("nhwc,nhwo->co", seen, cotangent), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel_size, stride, padding, dtype", [
    (9, 3, 1, ((1, 1), (1, 1)), "float32"), (10, 3, 2, ((1, 1), (1, 1)), "float32"),
    (9, 3, 2, ((1, 1), (1, 1)), "bfloat16"), (13, 7, 2, ((3, 3), (3, 3)), "float32"), (11, 3, 2, "SAME", "float32"),
    (12, 4, 4, "VALID", "float32"), (7, 1, 2, "VALID", "float32")])
def test_xla_conv_gradients_inside_a_loop_are_jaxs_in_eigens_layout(size, kernel_size, stride, padding, dtype):
    """The CPU convs' gradients where the C++ kernels are off (bfloat16, a batch over several devices, AVX2 CPUs,
    patch embeddings, TensorFlow's padding): `layers.conv_input_gradient` and `layers.conv_weight_gradient` equal
    jax.vjp of XLA's convolution, and in a loop's body, as the trainer's loop of steps runs them, XLA:CPU compiles
    them in the layout it hands to Eigen (b01f_01io->b01f). JAX's own weight gradient there has the images as
    features (f01b_i01o->01bf), which XLA:CPU runs in plain loops, 25-90x slower. (The input gradient of a conv
    whose stride is its size, a patch embedding's, XLA:CPU lays out otherwise inside a loop and out; nothing
    differentiates a patch embedding's input.)"""
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 5)), dtype)
    kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 6)), dtype)
    hook = layers.cpu_conv_hook()
    conv_options = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    out, pullback = jax.vjp(lambda x, kernel: hook(x, kernel, (stride, stride), padding, **conv_options), x, kernel)
    expected_out, expected_pullback = jax.vjp(
        lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, **conv_options), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=out.shape), dtype)
    for got, expected in zip((out, *pullback(cotangent)), (expected_out, *expected_pullback(cotangent))):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        expected = np.asarray(expected, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=0, atol=1e-6 * np.abs(expected).max())

    wrt = (0, 1) if kernel_size > stride else (1,)  # the input gradient of convs whose windows overlap

    def gradients_in_a_loop(x, kernel, cotangent):
        def add_gradients(_, totals):
            grads = jax.vjp(lambda x, kernel: hook(x, kernel, (stride, stride), padding, **conv_options), x, kernel)[1](
                cotangent)
            return tuple(total + grads[i] for total, i in zip(totals, wrt))
        return jax.lax.fori_loop(0, 2, add_gradients, tuple(jnp.zeros_like((x, kernel)[i]) for i in wrt))

    program = jax.jit(gradients_in_a_loop).lower(x, kernel, cotangent).compile().as_text()
    layouts = re.findall(r" convolution\(.*dim_labels=([^,]+),", program)
    assert layouts == ["b01f_01io->b01f"] * len(wrt), layouts


@pytest.mark.parametrize("in_a_conditional", [True, False])
def test_gelu_matches_float64_and_torch(in_a_conditional, monkeypatch):
    """layers.gelu in both CPUs' forms (its own conditional on AVX-512, plain on the others), jitted as in a
    model: value and gradient against the exact GELU in float64, and against torch.nn.functional.gelu. A NaN in
    the first element, the conditional's predicate, leaves the others' values as they are."""
    monkeypatch.setattr(layers, "_materialise_gelu", lambda: in_a_conditional)
    x = np.concatenate([[np.nan], np.linspace(-9.0, 9.0, 2001)]).astype(np.float32).reshape(2, 7, 11, 13)

    @jax.jit
    def value_and_grad(x):
        value, pullback = jax.vjp(layers.gelu, x)
        return value, pullback(jnp.ones_like(x))[0]

    value, grad = value_and_grad(jnp.asarray(x))
    x64 = x.astype(np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    cdf = 0.5 * (1.0 + erf(x64 / math.sqrt(2.0)))
    np.testing.assert_allclose(value, x64 * cdf, rtol=1e-6, atol=2e-6, equal_nan=True)
    np.testing.assert_allclose(grad, cdf + x64 * np.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi), rtol=1e-6,
                               atol=2e-6, equal_nan=True)
    np.testing.assert_allclose(value, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=2e-6,
                               equal_nan=True)
    assert np.isnan(value.reshape(-1)[0]) and not np.isnan(value.reshape(-1)[1:]).any()


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_gelu_in_a_conditional_on_a_batch_sharded_over_devices(axis_type, monkeypatch):
    """The conditional's predicate reads each sample's first element, so that it never slices a batch-sharded
    activation across devices (with explicit sharding that is an error)."""
    monkeypatch.setattr(layers, "_materialise_gelu", lambda: True)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),))
    x = np.random.default_rng(0).normal(size=(8, 5, 3)).astype(np.float32)
    with jax.set_mesh(mesh):
        value = jax.jit(layers.gelu)(jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data"))))
    np.testing.assert_allclose(value, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("as_select", [True, False])
def test_relu_matches_torch_at_zero_and_on_nan(as_select, monkeypatch):
    """layers.relu in both forms (a select on x86 CPUs with AVX2 and FMA, flax's elsewhere), jitted as in a model:
    value and gradient exactly torch's, on values that include the kink (torch's gradient at 0 is 0), signed
    zeros, infinities and NaN (which stays NaN; at NaN the gradient is flax's, 0, where torch's passes the
    cotangent on)."""
    monkeypatch.setattr(layers, "_relu_as_select", lambda: as_select)
    x = np.array([np.nan, -np.inf, -7.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 6.0, np.inf], np.float32)
    cotangent = np.arange(1, x.size + 1, dtype=np.float32)

    @jax.jit
    def value_and_grad(x):
        value, pullback = jax.vjp(layers.relu, x)
        return value, pullback(jnp.asarray(cotangent))[0]

    value, grad = value_and_grad(jnp.asarray(x))
    torch_x = torch.from_numpy(x).requires_grad_()
    torch_value = torch.nn.functional.relu(torch_x)
    torch_value.backward(torch.from_numpy(cotangent))
    np.testing.assert_array_equal(value, torch_value.detach().numpy())
    number = ~np.isnan(x)
    np.testing.assert_array_equal(grad[number], torch_x.grad.numpy()[number])
    assert grad[0] == 0.0


@pytest.mark.parametrize("form", ["shifted_max, C++", "shifted_max", "flax"])
@pytest.mark.parametrize("size, dtype", [(8, "float32"), (9, "float32"), (9, "bfloat16")])
def test_max_pool_matches_torch_with_ties(form, size, dtype, monkeypatch):
    """Values and gradient against torch.nn.functional.max_pool2d(3, 2, 1), on small integers, so that most
    windows hold several equal maxima: the gradient must go to the first one in row-major order, as torch's (a
    wrong choice moves a whole cotangent; where windows overlap, the sums' order may differ in the last bit; in
    bfloat16 the sums are rounded). In each form: the strided slices with the C++ kernels' forward and backward
    passes (AVX-512 CPUs; in bfloat16 too) or XLA's, and flax's."""
    monkeypatch.setattr(layers, "_native_max_pool", lambda: form.endswith("C++"))
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite's process has 4 CPU devices
    shifted_max = form != "flax"
    rng = np.random.default_rng(size)
    x = rng.integers(0, 3, size=(2, size, size + 1, 4)).astype(np.float32)
    x[0, :3] = 0.0  # a block of zeros, as a ReLU leaves before ResNet's stem pool
    cotangent = rng.normal(size=(2, (size - 1) // 2 + 1, size // 2 + 1, 4)).astype(dtype).astype(np.float32)
    out, pullback = jax.vjp(lambda x: max_pool(x, 3, 2, 1, shifted_max), jnp.asarray(x, dtype))
    (grad,) = pullback(jnp.asarray(cotangent, dtype))
    assert out.dtype == grad.dtype == dtype
    out, grad = np.asarray(out, np.float32), np.asarray(grad, np.float32)

    torch_x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    torch_out = torch.nn.functional.max_pool2d(torch_x, 3, 2, 1)
    torch_out.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(out, torch_out.detach().numpy().transpose(0, 2, 3, 1))
    # bfloat16: the C++ kernel's sums rounded once, XLA's at each of up to three additions
    tolerance = 1e-6 if dtype == "float32" else 2**-8 if form.endswith("C++") else 3 * 2**-8
    np.testing.assert_allclose(grad, torch_x.grad.numpy().transpose(0, 2, 3, 1), rtol=tolerance, atol=1e-7)


def test_max_pool_kernels_equal_xla_form_on_infinities_and_nan(monkeypatch):
    """The C++ max-pool and its gradient against the strided slices' XLA forms where torch has no say: a window whose
    in-image values are all -inf (its first tap is then a padded one, which takes the gradient away), windows with
    a NaN (whose maximum equals no tap), and a stride-1 pool with more padding. The C++ form's backward pass keeps
    the int8 taps, not x."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
    x[0, :2, :2] = -np.inf
    x[1, 4, 5, 1] = np.nan
    monkeypatch.setattr(jax, "device_count", lambda: 1)  # the suite's process has 4 CPU devices
    outs, grads = {}, {}
    for native in (True, False):
        monkeypatch.setattr(layers, "_native_max_pool", lambda: native)
        for k, stride, pad in [(3, 2, 1), (3, 1, 2)]:
            out, pullback = jax.vjp(lambda x: max_pool(x, k, stride, pad, True), jnp.asarray(x))
            kept = {(leaf.shape, leaf.dtype.name) for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "dtype")}
            assert kept == ({(out.shape, "int8")} if native else {(x.shape, "float32")})
            cotangent = np.random.default_rng(k * stride + pad).normal(size=out.shape).astype(np.float32)
            outs[native, stride] = np.asarray(out)
            grads[native, stride] = np.asarray(pullback(jnp.asarray(cotangent))[0])
    for stride in (2, 1):
        np.testing.assert_array_equal(outs[True, stride], outs[False, stride])
        np.testing.assert_allclose(grads[True, stride], grads[False, stride], rtol=1e-6, atol=1e-6)
    assert np.isnan(outs[True, 2][1, 2, 2, 1])
    assert grads[True, 2][0, 0, 0].tolist() == [0.0, 0.0, 0.0]  # the all -inf window's gradient left with the padding
    assert grads[True, 2][1, 4, 5, 1] == 0.0  # a NaN maximum takes its gradient nowhere
