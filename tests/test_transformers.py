"""ViT, Swin and ConvNeXt against torchvision: logits, features and stage maps, conversion both ways.

Small configurations of the same code are compared with torchvision's own classes built with the same
arguments; one 224 px model per family is compared at full size. Every parameter is randomised first:
torchvision's init zeroes the ViT head and scales ConvNeXt's blocks by 1e-6, which would hide mistakes.
"""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig
from torchvision.models.swin_transformer import SwinTransformer as TorchSwinTransformer

from kdep_jax import convert, pipeline
from kdep_jax.convert import (ConversionError, from_torch_state_dict, from_torchvision, load_converted,
                              to_torch_state_dict, to_torchvision)
from kdep_jax.models import create_model, feature_dim
from kdep_jax.models.layers import stochastic_depth
from conftest import tiny_config

PARITY_TOLERANCE = 1e-4
NEW_ARCHS = ("vit_b_16", "vit_b_32", "vit_l_16", "swin_t", "swin_s", "swin_b", "convnext_tiny", "convnext_small",
             "convnext_base")

# (torchvision module, the same configuration through create_model, input height and width)
SMALL_VIT = dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=32, mlp_dim=64)
# One block in the last two stages: at the sizes below their windows cover the whole map, so no block there
# would shift anyway.
SMALL_SWIN = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(2, 2, 4, 4))
SMALL_CONVNEXT = ((8, 16, 1), (16, 32, 1), (32, 64, 2), (64, None, 1))
SMALL_CONFIGS = {
    "vit": (lambda: torchvision.models.VisionTransformer(**SMALL_VIT),
            lambda: create_model("vit_b_16", **SMALL_VIT), (32, 32)),
    # 64 px: the last two stages (4x4, 2x2) are padded to one 7x7 window and not shifted, the first two are
    # padded and shifted. 80x112: odd maps in PatchMerging (5x7 -> 3x4), a non-square input.
    "swin_64": (lambda: TorchSwinTransformer(patch_size=[4, 4], window_size=[7, 7], **SMALL_SWIN),
                lambda: create_model("swin_t", **SMALL_SWIN), (64, 64)),
    "swin_80x112": (lambda: TorchSwinTransformer(patch_size=[4, 4], window_size=[7, 7], **SMALL_SWIN),
                    lambda: create_model("swin_t", **SMALL_SWIN), (80, 112)),
    "convnext": (lambda: torchvision.models.convnext.ConvNeXt([CNBlockConfig(*setting) for setting in SMALL_CONVNEXT]),
                 lambda: create_model("convnext_tiny", block_setting=SMALL_CONVNEXT), (64, 64)),
}


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and of a size that matters: LayerNorm weights 1 + N(0, 0.2^2), conv/linear/in_proj
    weights N(0, 1/fan_in), everything else (biases, class token, position embedding, relative position bias,
    layer scale) N(0, 0.5^2). Returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator)
                if isinstance(module, torch.nn.LayerNorm):
                    parameter.copy_((1.0 if name == "weight" else 0.0) + 0.2 * noise)
                elif name.endswith("weight"):
                    parameter.copy_(noise / math.sqrt(parameter[0].numel()))
                else:
                    parameter.copy_(0.5 * noise)
    return model.eval()


def torchvision_reference(model: torch.nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """logits and every feature of the contract, read from torchvision's own modules by forward hooks (NHWC)."""
    captured = {}
    if isinstance(model, torchvision.models.VisionTransformer):
        layers = len(model.encoder.layers)
        modules = {f"stage{stage}": model.encoder.layers[layers * stage // 4 - 1] for stage in (1, 2, 3)}
        modules["final"] = model.encoder.ln
    elif isinstance(model, TorchSwinTransformer):
        modules = {"stage1": model.features[1], "stage2": model.features[3], "stage3": model.features[5],
                   "final": model.norm}
    else:
        modules = {"stage1": model.features[1], "stage2": model.features[3], "stage3": model.features[5],
                   "stage4": model.features[7], "final": model.classifier[0]}
    hooks = [module.register_forward_hook(lambda m, i, output, name=name: captured.__setitem__(name, output.clone()))
             for name, module in modules.items()]
    with torch.no_grad():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    outputs = {"logits": logits}
    if isinstance(model, torchvision.models.VisionTransformer):
        grid = model.image_size // model.patch_size
        captured["stage4"] = captured["final"]
        outputs["pooled"] = captured["final"][:, 0]
        for stage in range(1, 5):
            outputs[f"stage{stage}"] = captured[f"stage{stage}"][:, 1:].reshape(len(images), grid, grid, -1)
    elif isinstance(model, TorchSwinTransformer):
        outputs["pooled"] = captured["final"].mean((1, 2))
        outputs.update({f"stage{stage}": captured[f"stage{stage}"] for stage in (1, 2, 3)}, stage4=captured["final"])
    else:
        outputs["pooled"] = captured["final"].flatten(1)
        outputs.update({f"stage{stage}": captured[f"stage{stage}"].permute(0, 2, 3, 1) for stage in range(1, 5)})
    outputs["pre_relu"] = outputs["pooled"]  # no activation follows these features (see kdep_jax.models)
    return {name: value.numpy() for name, value in outputs.items()}


def parity_errors(model, variables, torch_model, images: torch.Tensor) -> dict[str, float]:
    expected = torchvision_reference(torch_model, images)
    logits, features = jax.jit(model.apply)(variables, images.numpy().transpose(0, 2, 3, 1))
    ours = {"logits": logits, **features}
    assert set(ours) == set(expected)
    assert all(ours[name].shape == expected[name].shape for name in expected)
    assert all(value.dtype == jnp.float32 for value in ours.values())
    return {name: relative_error(ours[name], expected[name]) for name in expected}


def random_images(height: int, width: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def report(label: str, errors: dict[str, float]) -> None:
    print(f"\n{label} parity (max abs error / max abs value): "
          + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))


def assert_same_state_dict(ours: dict, reference: dict, same_order: bool) -> None:
    assert list(ours) == list(reference) if same_order else sorted(ours) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), value.numpy(), err_msg=key)
        assert np.asarray(ours[key]).dtype == value.numpy().dtype, key


def load_strictly(torch_model: torch.nn.Module, state_dict: dict[str, np.ndarray]) -> torch.nn.Module:
    torch_model.load_state_dict({key: torch.from_numpy(value) for key, value in state_dict.items()}, strict=True,
                                assign=True)
    return torch_model.eval()


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_configuration_matches_torchvision_and_converts_back(name):
    """Same logits, features and stage maps; the exported state_dict is torchvision's bit for bit and loads
    strictly (Swin: its relative_position_index buffers included), giving the same logits."""
    make_torch_model, make_model, (height, width) = SMALL_CONFIGS[name]
    torch_model = randomize(make_torch_model(), seed=len(name))
    model = make_model()
    variables = from_torch_state_dict(torch_model.state_dict(), model)
    images = random_images(height, width)
    errors = parity_errors(model, variables, torch_model, images)
    report(name, errors)
    assert max(errors.values()) < PARITY_TOLERANCE, errors

    exported = to_torch_state_dict(variables, model)
    # Swin's state_dict lists PatchMerging's reduction before its norm, while they are called norm first.
    assert_same_state_dict(exported, torch_model.state_dict(), same_order=not name.startswith("swin"))
    with torch.no_grad():
        np.testing.assert_array_equal(load_strictly(make_torch_model(), exported)(images), torch_model(images))


def test_vit_with_the_cpu_kernels_matches_torchvision(monkeypatch):
    """What a teacher's forward pass in one process on a CPU with AMX tiles runs: ViT's attention (heads of 64
    features, as every torchvision ViT's) and its Linear layers, q/k/v's included, given their kernels packed
    (`layers.with_packed_dense_kernels`), by kdep_jax's C++ kernels, as close to torchvision as XLA's forms."""
    from kdep_jax.models import layers

    monkeypatch.setattr(layers, "_native_attention", lambda: True)
    monkeypatch.setattr(layers, "_native_dense", lambda: True)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    config = dict(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=128, mlp_dim=64)
    torch_model = randomize(torchvision.models.VisionTransformer(**config), seed=5)
    model = create_model("vit_b_16", **config)
    variables = layers.with_packed_dense_kernels(from_torch_state_dict(torch_model.state_dict(), model))
    images = random_images(32, 32)
    program = jax.jit(model.apply).lower(variables, images.numpy().transpose(0, 2, 3, 1)).compile().as_text()
    assert '"kdep_attention"' in program
    assert program.count('custom_call_target="kdep_dense"') == 4 * 4  # q/k/v, out_proj and the MLP's two
    errors = parity_errors(model, variables, torch_model, images)
    report("vit with the CPU kernels", errors)
    assert max(errors.values()) < PARITY_TOLERANCE, errors


@pytest.mark.parametrize("name", ["vit", "swin_64"])
def test_last_stage_is_torchvisions_layers_after_stage3(name):
    """`last_stage` on any map shaped as stage 3 is torchvision's own layers after stage 3 on it: Swin's
    features.6 (PatchMerging), features.7 and norm; ViT's last quarter of encoder.layers and encoder.ln, on the
    patch tokens alone (no class token)."""
    make_torch_model, make_model, (height, width) = SMALL_CONFIGS[name]
    torch_model = randomize(make_torch_model(), seed=3)
    model = make_model()
    variables = from_torch_state_dict(torch_model.state_dict(), model)
    stage3 = jax.eval_shape(model.apply, variables, jnp.zeros((2, height, width, 3)))[1]["stage3"]
    x = torch.randn(stage3.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if name == "vit":
            tokens = x.flatten(1, 2)
            for layer in torch_model.encoder.layers[3 * len(torch_model.encoder.layers) // 4:]:
                tokens = layer(tokens)
            expected = torch_model.encoder.ln(tokens).reshape(x.shape)
        else:
            expected = torch_model.norm(torch_model.features[7](torch_model.features[6](x)))
    ours = jax.jit(lambda v, x: model.apply(v, x, method="last_stage"))(variables, x.numpy())
    assert ours.shape == expected.shape and ours.dtype == jnp.float32
    assert relative_error(ours, expected.numpy()) < PARITY_TOLERANCE


def meta_model(arch: str) -> torch.nn.Module:
    """torchvision's arch on the meta device: its shapes without memory or init time."""
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def zero_stride_state_dict(torch_model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict keys and shapes as zero-stride numpy arrays (no memory)."""
    return {key: np.broadcast_to(np.float32(0), value.shape) for key, value in torch_model.state_dict().items()}


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_every_arch_has_torchvisions_keys_and_shapes(arch):
    """create_model(arch) holds exactly torchvision's variables (its state_dict's keys and shapes import), and
    feature_dim is the input width of torchvision's head (its last Linear)."""
    torch_model = meta_model(arch)
    variables = from_torchvision(zero_stride_state_dict(torch_model), arch)
    assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables)) == sum(
        parameter.numel() for parameter in torch_model.parameters())
    head = [module for module in torch_model.modules() if isinstance(module, torch.nn.Linear)][-1]
    assert feature_dim(arch) == head.in_features


@pytest.mark.parametrize("source, asked, words", [
    ("swin_t", "vit_b_16", ["not a vit_b_16", "missing key(s), first 'class_token'", "looks like a swin_t"]),
    ("vit_b_32", "vit_b_16", ["'conv_proj.weight' has shape (768, 3, 32, 32), expected (768, 3, 16, 16)",
                              "pass --arch vit_b_32"]),
])
def test_wrong_arch_names_the_arch_it_looks_like(source, asked, words):
    with pytest.raises(ConversionError) as error:
        from_torchvision(zero_stride_state_dict(meta_model(source)), asked)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_vit_imports_older_mlp_key_names():
    """torchvision before 0.14 saved the MLP layers as mlp.linear_1 / mlp.linear_2 (today mlp.0 / mlp.3)."""
    torch_model = randomize(torchvision.models.VisionTransformer(**SMALL_VIT), seed=1)
    model = create_model("vit_b_16", **SMALL_VIT)
    current = torch_model.state_dict()
    older = {key.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): value
             for key, value in current.items()}
    assert "encoder.layers.encoder_layer_0.mlp.linear_1.weight" in older
    jax.tree.map(np.testing.assert_array_equal, from_torch_state_dict(older, model),
                 from_torch_state_dict(current, model))
    assert list(to_torch_state_dict(from_torch_state_dict(older, model), model)) == list(current)


def test_fixed_width_families_refuse_other_widths():
    with pytest.raises(ValueError, match="swin_t has no width multiplier.*width=1.0"):
        create_model("swin_t", width=0.5)
    with pytest.raises(ValueError, match="vit_b_16 has no width multiplier"):
        feature_dim("vit_b_16", 2.0)


def test_vit_refuses_another_image_size():
    model = create_model("vit_b_16", **SMALL_VIT)
    with pytest.raises(ValueError, match="takes 32x32 images.*got 64x64.*image_size=64"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("name", ["vit", "swin_64", "convnext"])
def test_bfloat16_computes_with_float32_params_and_outputs(name):
    _, make_model, (height, width) = SMALL_CONFIGS[name]
    model = make_model().clone(dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
    (logits, features), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((variables, logits, features)))


def test_bfloat16_vit_close_to_float32():
    make_torch_model, make_model, (height, width) = SMALL_CONFIGS["vit"]
    model = make_model()
    variables = from_torch_state_dict(randomize(make_torch_model(), seed=2).state_dict(), model)
    images = random_images(height, width).numpy().transpose(0, 2, 3, 1)
    logits, features = jax.jit(model.apply)(variables, images)
    low_logits, low_features = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, images)
    reference, ours = {"logits": logits, **features}, {"logits": low_logits, **low_features}
    errors = {key: relative_error(ours[key], reference[key]) for key in reference}
    assert max(errors.values()) < 5e-2, errors


def test_stochastic_depth_drops_whole_samples_only_with_a_dropout_rng():
    """torchvision's StochasticDepth(p, "row") in train mode: each sample kept with probability 1 - p, scaled by
    1 / (1 - p); without a "dropout" rng, or in eval mode, the identity."""
    class Branch(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return stochastic_depth(self, x, 0.5, train)

    x = jnp.ones((256, 3, 3, 4))
    dropped = Branch().apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_sample = np.asarray(dropped).reshape(256, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    assert 0.35 < (per_sample[:, 0] == 0).mean() < 0.65
    np.testing.assert_array_equal(Branch().apply({}, x, train=True), x)
    np.testing.assert_array_equal(Branch().apply({}, x, train=False, rngs={"dropout": jax.random.key(0)}), x)


@pytest.fixture(scope="module")
def full_size_models():
    """arch -> randomised torchvision model at torchvision's own configuration, built once per module."""
    cache = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            torch.manual_seed(0)
            cache[arch] = randomize(getattr(torchvision.models, arch)(), seed=NEW_ARCHS.index(arch))
        return cache[arch]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b_16", "swin_t", "convnext_tiny"])
def test_full_size_224px_matches_torchvision_and_exports_strictly(arch, full_size_models):
    torch_model = full_size_models(arch)
    variables = from_torchvision(torch_model.state_dict(), arch)
    images = random_images(224, 224, batch=1)
    errors = parity_errors(create_model(arch), variables, torch_model, images)
    report(f"{arch} 224 px", errors)
    assert max(errors.values()) < PARITY_TOLERANCE, errors

    exported = to_torchvision(variables, arch)
    load_strictly(meta_model(arch), exported)  # assigns every tensor: no init
    # Bit for bit the same tensors in the same modules: the same logits (the small configurations run them).
    assert_same_state_dict(exported, torch_model.state_dict(), same_order=arch != "swin_t")


@pytest.mark.slow
def test_cli_import_and_export_of_swin_t(full_size_models, tmp_path):
    """Through the files: import, then export to a .pth that torchvision loads strictly, buffers included."""
    torch_model = full_size_models("swin_t")
    checkpoint = tmp_path / "swin_t.pth"
    torch.save(torch_model.state_dict(), checkpoint)
    assert convert.main(["import", "--arch", "swin_t", "--input", str(checkpoint), "--output",
                         str(tmp_path / "converted")]) == 0
    assert load_converted(tmp_path / "converted", "swin_t")[1]["num_classes"] == 1000
    assert convert.main(["export", "--arch", "swin_t", "--input", str(tmp_path / "converted"), "--output",
                         str(tmp_path / "exported.pth")]) == 0
    exported = torch.load(tmp_path / "exported.pth", weights_only=True)
    meta_model("swin_t").load_state_dict(exported, strict=True, assign=True)
    assert_same_state_dict(exported, torch_model.state_dict(), same_order=False)


@pytest.mark.slow
def test_the_tiny_demo_with_a_transformer_teacher(tmp_path):
    """configs/demo.py:tiny_vit: a small ViT (torchvision's code) trained as the teacher, its class token distilled
    into a ResNet-18, both fine-tuned downstream."""
    outputs = pipeline.run(tiny_config("tiny_vit"), tmp_path)
    assert {row["init"] for row in outputs["results"]} == {"kdep", "scratch"}
    assert json.loads((tmp_path / "teacher" / "model" / "meta.json").read_text())["arch"] == "vit_b_16"
