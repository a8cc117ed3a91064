"""Checkpoint conversion: round trips through torchvision's own modules, the CLI, and every bad input."""
import json
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision

from kdep_jax import convert
from kdep_jax.convert import (ConversionError, from_torch_state_dict, from_torchvision, load_converted,
                              save_converted, to_torch_state_dict, to_torchvision)
from kdep_jax.models import TorchNaming, create_model
from kdep_jax.models.layers import BatchNorm, conv2d, global_avg_pool
from kdep_jax.models.naming import torch_leaf

CNN_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")  # the transformers: test_transformers.py


def random_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision state_dict with random weights and random BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor in (module.running_mean, module.weight, module.bias):
                    tensor.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model.state_dict()


def assert_same_state_dict(ours: dict, reference: dict, same_order: bool = True) -> None:
    """Same keys (in the same order unless said otherwise), every tensor equal bit for bit (num_batches_tracked:
    int64 zeros)."""
    assert list(ours) == list(reference) if same_order else sorted(ours) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), value.numpy(), err_msg=key)
        assert np.asarray(ours[key]).dtype == value.numpy().dtype, key


def load_strictly(arch: str, state_dict: dict) -> torch.nn.Module:
    model = getattr(torchvision.models, arch)()
    model.load_state_dict({key: torch.as_tensor(value) for key, value in state_dict.items()}, strict=True)
    return model.eval()


def files_under(path) -> set[str]:
    return {str(child.relative_to(path)) for child in path.rglob("*")}


@pytest.fixture(scope="module")
def resnet18_state():
    # The reference keeps num_batches_tracked at torch's initial 0, which to_torchvision writes.
    return random_state_dict("resnet18")


@pytest.fixture(scope="module")
def converted_resnet18(resnet18_state, tmp_path_factory):
    directory = tmp_path_factory.mktemp("converted") / "resnet18"
    save_converted(directory, from_torchvision(resnet18_state, "resnet18"), "resnet18", source="test")
    return directory


@pytest.mark.parametrize("arch", CNN_ARCHS)
def test_torchvision_to_flax_to_torchvision_is_exact(arch):
    reference = random_state_dict(arch, seed=CNN_ARCHS.index(arch))
    variables = from_torchvision(reference, arch)
    assert set(variables) == {"params", "batch_stats"}
    assert_same_state_dict(to_torchvision(variables, arch), reference)


def test_variables_are_a_copy_of_the_state_dict():
    """A torch model in train mode updates its BN buffers in place; the converted variables must not follow."""
    model = torchvision.models.resnet18()
    variables = from_torchvision(model.state_dict(), "resnet18")
    with torch.no_grad():
        model.bn1.running_mean.fill_(7.0)
        model.fc.bias.fill_(7.0)
    assert not (variables["batch_stats"]["bn1"]["mean"] == 7.0).any()
    assert not (variables["params"]["fc"]["bias"] == 7.0).any()


def test_flax_variables_load_strictly_with_identical_outputs():
    """Variables that never came from torch (random, in Flax layouts) -> torchvision -> the same outputs."""
    model = create_model("resnet18")
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(1)

    def random_leaf(path, leaf):
        if path[-1].key == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(random_leaf, shapes)
    torch_model = load_strictly("resnet18", to_torchvision(variables, "resnet18"))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    logits, _ = jax.jit(model.apply)(variables, images)
    error = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
    assert error < 1e-5, error


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v2", "classifier.1")])
def test_headless_variables_export_with_a_zero_head(arch, head):
    state = random_state_dict(arch)
    headless = {key: value for key, value in state.items() if not key.startswith(head)}
    variables = from_torchvision(headless, arch)
    assert head.replace(".", "_") not in variables["params"]
    exported = to_torchvision(variables, arch)
    load_strictly(arch, exported)
    assert exported[f"{head}.weight"].shape == state[f"{head}.weight"].shape
    assert not exported[f"{head}.weight"].any() and not exported[f"{head}.bias"].any()


@pytest.mark.parametrize("form", ["plain", "wrapped_state_dict", "wrapped_model_with_module_prefix", "safetensors"])
def test_cli_import(form, resnet18_state, tmp_path):
    if form == "safetensors":
        checkpoint = tmp_path / "resnet18.safetensors"
        safetensors.numpy.save_file({key: value.numpy() for key, value in resnet18_state.items()}, checkpoint)
    else:
        checkpoint = tmp_path / "resnet18.pth"
        content = {"plain": resnet18_state,
                   "wrapped_state_dict": {"state_dict": resnet18_state, "epoch": 3},
                   "wrapped_model_with_module_prefix": {"model": {f"module.{k}": v for k, v in resnet18_state.items()}},
                   }[form]
        torch.save(content, checkpoint)
    output = tmp_path / "converted"
    assert convert.main(["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", str(output)]) == 0
    assert files_under(output) == {"variables.msgpack", "meta.json"}
    variables, meta = load_converted(output, "resnet18")
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 1000 and meta["source"] == str(checkpoint)
    assert_same_state_dict(to_torchvision(variables, "resnet18"), resnet18_state)


@pytest.mark.parametrize("output_name, from_workdir", [("student.pth", False), ("student.safetensors", True)])
def test_cli_export(output_name, from_workdir, converted_resnet18, resnet18_state, tmp_path):
    source = converted_resnet18
    if from_workdir:  # the distillation trainer's layout: WORKDIR/student/
        source = tmp_path / "workdir"
        (source / "student").mkdir(parents=True)
        for name in ("variables.msgpack", "meta.json"):
            (source / "student" / name).write_bytes((converted_resnet18 / name).read_bytes())
    output = tmp_path / output_name
    assert convert.main(["export", "--arch", "resnet18", "--input", str(source), "--output", str(output)]) == 0
    if output.suffix == ".safetensors":
        exported = safetensors.numpy.load_file(output)  # safetensors stores keys sorted
    else:
        exported = torch.load(output, weights_only=True)
    load_strictly("resnet18", exported)
    assert_same_state_dict(exported, resnet18_state, same_order=output.suffix != ".safetensors")
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == [output_name]


def test_save_and_load_converted(resnet18_state, tmp_path, monkeypatch):
    variables = from_torchvision(resnet18_state, "resnet18")
    directory = tmp_path / "converted"
    meta = save_converted(directory, variables, "resnet18", source="somewhere.pth")
    loaded, loaded_meta = load_converted(directory)
    assert loaded_meta == meta == json.loads((directory / "meta.json").read_text())
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    save_converted(directory, variables, "resnet18")  # replacing a converted directory is allowed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # a failure half-way leaves the previous directory as it was
        patch.setattr(json, "dumps", fail)
        with pytest.raises(OSError, match="disk full"):
            save_converted(directory, variables, "resnet18", source="new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted"]
    assert load_converted(directory)[1]["source"] is None

    with pytest.raises(ConversionError, match="resnet18.*mobilenet_v2"):
        load_converted(directory, "mobilenet_v2")

    payload = bytearray((directory / "variables.msgpack").read_bytes())
    payload[-1] ^= 1
    (directory / "variables.msgpack").write_bytes(bytes(payload))
    with pytest.raises(ConversionError, match="corrupted.*sha256"):
        load_converted(directory)


def test_save_converted_refuses_to_overwrite_other_files(resnet18_state, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not a converted checkpoint directory"):
        save_converted(tmp_path / "notes", from_torchvision(resnet18_state, "resnet18"), "resnet18")
    assert files_under(tmp_path) == {"notes", "notes/keep.txt"}


def write_bad_input(kind: str, tmp_path, resnet18_state) -> tuple[list[str], list[str]]:
    """(CLI arguments, words the error must contain) for one kind of bad input."""
    checkpoint = tmp_path / "input.pth"
    output = str(tmp_path / "out")
    if kind == "missing_file":
        return (["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", output],
                ["not found", "input.pth"])
    if kind == "not_a_checkpoint":
        checkpoint.write_text("this is not a checkpoint\n")
        return (["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", output],
                ["input.pth", "not a PyTorch checkpoint"])
    if kind == "not_safetensors":
        checkpoint = tmp_path / "input.safetensors"
        checkpoint.write_bytes(b"\x00" * 64)
        return (["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", output],
                ["input.safetensors", "not a safetensors checkpoint"])
    if kind == "not_a_state_dict":
        torch.save({"epoch": 3, "lr": 0.1}, checkpoint)
        return (["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", output],
                ["input.pth", "not a state_dict", "epoch"])
    if kind == "other_arch":
        torch.save(resnet18_state, checkpoint)
        return (["import", "--arch", "resnet34", "--input", str(checkpoint), "--output", output],
                ["not a resnet34", "missing", "'layer1.2.conv1.weight'", "(64, 64, 3, 3)", "looks like a resnet18"])
    if kind == "mis_shaped":
        torch.save({**resnet18_state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, checkpoint)
        return (["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", output],
                ["'conv1.weight'", "(64, 3, 3, 3)", "expected (64, 3, 7, 7)"])
    if kind == "unknown_arch":
        torch.save(resnet18_state, checkpoint)
        return (["import", "--arch", "resnet101", "--input", str(checkpoint), "--output", output],
                ["unknown arch 'resnet101'", "resnet18, resnet34, resnet50, mobilenet_v2"])
    if kind == "export_without_converted_dir":
        (tmp_path / "empty_workdir").mkdir()
        return (["export", "--arch", "resnet18", "--input", str(tmp_path / "empty_workdir"), "--output",
                 str(tmp_path / "student.pth")], ["no converted checkpoint", "meta.json", "student"])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_file", "not_a_checkpoint", "not_safetensors", "not_a_state_dict",
                                  "other_arch", "mis_shaped", "unknown_arch", "export_without_converted_dir"])
def test_bad_input_gives_one_clear_error_and_writes_nothing(kind, resnet18_state, tmp_path, capsys):
    argv, words = write_bad_input(kind, tmp_path, resnet18_state)
    before = files_under(tmp_path)
    assert convert.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    for word in words:
        assert word in error, (word, error)
    assert files_under(tmp_path) == before


def test_export_of_wrong_arch_names_both(converted_resnet18, tmp_path, capsys):
    assert convert.main(["export", "--arch", "resnet50", "--input", str(converted_resnet18), "--output",
                         str(tmp_path / "student.pth")]) == 2
    assert "resnet18" in capsys.readouterr().err and not (tmp_path / "student.pth").exists()


@pytest.mark.parametrize("command", ["import", "export"])
def test_missing_torch_says_how_to_install(command, resnet18_state, converted_resnet18, tmp_path, monkeypatch,
                                           capsys):
    checkpoint = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, checkpoint)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    before = files_under(tmp_path)
    if command == "import":
        argv = ["import", "--arch", "resnet18", "--input", str(checkpoint), "--output", str(tmp_path / "out")]
    else:
        argv = ["export", "--arch", "resnet18", "--input", str(converted_resnet18), "--output",
                str(tmp_path / "student.pth")]
    assert convert.main(argv) == 2
    error = capsys.readouterr().err
    assert "pip install torch torchvision" in error and "kdep_jax[convert]" in error
    assert files_under(tmp_path) == before


def test_safetensors_export_needs_no_torch(converted_resnet18, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    output = tmp_path / "student.safetensors"
    assert convert.main(["export", "--arch", "resnet18", "--input", str(converted_resnet18), "--output",
                         str(output)]) == 0
    assert "fc.weight" in safetensors.numpy.load_file(output)


def nested_torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Module names are the torch attribute names themselves: ("_bn0", "mean") -> "_bn0.running_mean"."""
    *modules, leaf = path
    return ".".join([*modules, torch_leaf(collection, leaf)])


class UnderscoreNet(nn.Module):
    """A family named like efficientnet_pytorch (`_conv_stem`, `_bn0`, `_fc`), plugged in by its torch_naming."""
    num_classes: int | None = 10
    torch_naming = TorchNaming(head="_fc", torch_key=nested_torch_key)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(BatchNorm(name="_bn0")(conv2d(8, 3, name="_conv_stem")(x), train))
        pooled = global_avg_pool(x)
        return nn.Dense(self.num_classes, name="_fc")(pooled), {"pre_relu": pooled, "pooled": pooled}


class TorchUnderscoreNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self._bn0 = torch.nn.BatchNorm2d(8)
        self._fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self._fc(torch.relu(self._bn0(self._conv_stem(x))).mean((2, 3)))


def test_a_family_with_its_own_names_converts_both_ways_through_its_torch_naming():
    torch.manual_seed(0)
    torch_model = TorchUnderscoreNet().eval()
    with torch.no_grad():
        torch_model._bn0.running_var.uniform_(0.5, 1.5)
        torch_model._bn0.bias.normal_()
    images = torch.randn(2, 3, 16, 16)
    variables = from_torch_state_dict(torch_model.state_dict(), UnderscoreNet())
    logits, _ = UnderscoreNet().apply(variables, images.numpy().transpose(0, 2, 3, 1))
    with torch.no_grad():
        np.testing.assert_allclose(logits, torch_model(images).numpy(), rtol=1e-5, atol=1e-5)
    exported = to_torch_state_dict(variables, UnderscoreNet())
    assert_same_state_dict(exported, torch_model.state_dict())
    TorchUnderscoreNet().load_state_dict({key: torch.from_numpy(value) for key, value in exported.items()}, strict=True)


def test_a_module_without_torch_naming_cannot_be_converted():
    with pytest.raises(ConversionError, match="Dense has no torch_naming.*TorchNaming"):
        from_torch_state_dict({}, nn.Dense(3))
