"""The whole pipeline on the tiny demo variant: every stage, export, exact resume, and each bad input."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert, distill, parallel, pipeline, trainer

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    config = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]("tiny")
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete tiny demo run, shared by the tests that only read its outputs."""
    workdir = tmp_path_factory.mktemp("demo")
    outputs = pipeline.run(tiny_config(), workdir)
    return workdir, outputs


def test_all_stages_write_their_outputs(finished_run):
    workdir, outputs = finished_run
    for name in ("config.json", "teacher/model/meta.json", "alignment.npz", "checkpoints", "metrics.jsonl",
                 "student/meta.json", "student.pth", "student.safetensors", "results.json"):
        assert (workdir / name).exists(), name
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in row and "loss" in row for row in rows)
    assert all(np.isfinite(row["loss"]) for row in rows)
    assert list(workdir.glob("events.out.tfevents.*"))
    _, provenance = alignment_lib.load_alignment(workdir / "alignment.npz")
    assert provenance["teacher_sha256"] == json.loads((workdir / "teacher/model/meta.json").read_text())["sha256"]
    results = json.loads((workdir / "results.json").read_text())
    assert {row["init"] for row in results} == {"kdep", "scratch"}
    assert all(0.0 <= row["top1"] <= 100.0 for row in results)


def test_exported_student_loads_into_torchvision_and_matches(finished_run):
    workdir, _ = finished_run
    state_dict = torch.load(workdir / "student.pth", weights_only=True)
    model = torchvision.models.resnet18()
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    variables, _ = convert.load_converted(workdir / "student", "resnet18")
    from kdep_jax import models

    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    _, features = models.create_model("resnet18", num_classes=None).apply(variables, images, train=False)
    hooked = {}
    model.avgpool.register_forward_hook(lambda module, inputs, output: hooked.__setitem__("pooled", output))
    with torch.no_grad():
        model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    expected = hooked["pooled"].flatten(1).numpy()
    np.testing.assert_allclose(features["pooled"], expected, atol=1e-4 * np.abs(expected).max())


def test_killed_run_resumes_to_the_same_result(finished_run, tmp_path):
    """Losing the end of a run (the student and the last checkpoint) and rerunning gives the same student."""
    workdir, _ = finished_run
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(workdir), str(resumed)], check=True)
    for name in ("student", "student.pth", "student.safetensors", "results.json", "transfer_kdep", "transfer_scratch"):
        subprocess.run(["rm", "-rf", str(resumed / name)], check=True)
    steps = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2, steps
    subprocess.run(["rm", "-rf", str(resumed / "checkpoints" / str(steps[-1]))], check=True)
    (resumed / "config.json").unlink()  # the transfer stage is not what this test is about
    pipeline.run(tiny_config(downstream=None), resumed)
    original, _ = convert.load_converted(workdir / "student")
    again, _ = convert.load_converted(resumed / "student")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(original)):
        np.testing.assert_array_equal(a, b)
    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(row["step"], row["loss"], row["lr"]) for row in rows]

    assert losses(resumed) == losses(workdir)


def test_distillation_from_the_target_cache_follows_the_online_run(finished_run, tmp_path):
    """The same run with the teacher replaced by its cached targets: float16 targets, the same losses to 1e-2."""
    workdir, _ = finished_run
    cached = tmp_path / "cached"
    cached.mkdir()
    subprocess.run(["cp", "-r", str(workdir / "teacher"), str(workdir / "alignment.npz"), str(cached)], check=True)
    pipeline.run(tiny_config(downstream=None, **{"target_cache.enabled": True}), cached)
    assert (cached / "target_cache" / "meta.json").exists()

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    np.testing.assert_allclose(losses(cached), losses(workdir), rtol=1e-2)


def test_a_finished_run_is_not_repeated(finished_run, caplog):
    workdir, _ = finished_run
    before = (workdir / "student" / "variables.msgpack").read_bytes()
    with caplog.at_level("INFO"):
        pipeline.run(tiny_config(), workdir)
    assert "skipping" in caplog.text
    assert (workdir / "student" / "variables.msgpack").read_bytes() == before


def test_workdir_of_another_config_is_refused(finished_run):
    workdir, _ = finished_run
    with pytest.raises(ValueError, match="different config.*train.lr.*overwrite"):
        pipeline.run(tiny_config(**{"train.lr": 0.01}), workdir)


def test_missing_teacher_says_how_to_convert(tmp_path):
    config = tiny_config(**{"teacher.train": None, "teacher.path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="python -m kdep_jax.convert import"):
        pipeline.run(config, tmp_path / "run")


def test_teacher_of_another_architecture_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    # The student (a resnet18) given as a resnet50 teacher.
    config = tiny_config(**{"teacher.train": None, "teacher.path": str(workdir / "student"), "teacher.arch": "resnet50"})
    with pytest.raises(convert.ConversionError, match="resnet18"):
        pipeline.run(config, tmp_path / "run")


def test_alignment_of_another_teacher_is_recomputed(finished_run, tmp_path, caplog):
    workdir, _ = finished_run
    alignment, provenance = alignment_lib.load_alignment(workdir / "alignment.npz")
    alignment_lib.save_alignment(tmp_path / "alignment.npz", alignment, {**provenance, "teacher_sha256": "0" * 64})
    config = tiny_config()
    teacher_variables, teacher_sha256 = distill.load_teacher(config, workdir / "teacher" / "model")
    with caplog.at_level("WARNING"):
        recomputed = distill.compute_or_load_alignment(config, tmp_path, parallel.make_mesh(), teacher_variables,
                                                       teacher_sha256)
    assert "another teacher or data" in caplog.text and "teacher_sha256" in caplog.text
    _, new_provenance = alignment_lib.load_alignment(tmp_path / "alignment.npz")
    assert new_provenance["teacher_sha256"] == provenance["teacher_sha256"]
    # The same teacher on the same data and seed: the same statistics as the original run's.
    np.testing.assert_allclose(recomputed.singular_values, alignment.singular_values, rtol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    workdir, _ = finished_run
    config = tiny_config(**{"teacher.train": None, "teacher.path": str(workdir / "teacher" / "model"),
                            "downstream": None, "train.lr": 1e30, "log_every_steps": 1,
                            "checkpoint_every_steps": 1})
    with pytest.raises(trainer.TrainingError, match="loss became .* at or before step") as error:
        pipeline.run(config, tmp_path / "run")
    assert "last good checkpoint" in str(error.value)
    assert not (tmp_path / "run" / "student").exists()


def test_cli_reports_bad_config_override_and_errors(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    bad_key = subprocess.run([sys.executable, "-m", "kdep_jax.main", "--config=configs/demo.py:tiny",
                              f"--workdir={tmp_path}", "--config.train.lrr=1"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert bad_key.returncode != 0 and "lrr" in bad_key.stderr
    missing_teacher = subprocess.run([sys.executable, "-m", "kdep_jax.main", "--config=configs/r18.py",
                                      f"--workdir={tmp_path / 'r18'}", f"--config.teacher.path={tmp_path / 'none'}"],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert missing_teacher.returncode == 2
    assert "No converted teacher" in missing_teacher.stderr and "Traceback" not in missing_teacher.stderr
