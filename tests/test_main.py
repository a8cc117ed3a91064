"""The whole pipeline on the tiny demo variant: every stage, export, exact resume, and each bad input.

The end-to-end tests share one finished run and are marked slow; `test_one_distillation_step` is the fast
smoke test (one step of the real trainer on the tiny config).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import torchvision

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert, data, distill, methods, parallel, pipeline, trainer, validation, xla_flags
from kdep_jax import teacher as teacher_lib
from kdep_jax.methods import kdep as kdep_method
from kdep_jax.errors import ConfigError
from conftest import REPO, small_transfer_config, tiny_config
from tiny_images import TinyImages


def test_one_distillation_step():
    """The smoke test: the tiny config's teacher, alignment, student and SGD step, once, with a finite loss."""
    config = tiny_config("tiny_distill", **{"teacher.width": 0.25, "student.width": 0.25})
    mesh = parallel.make_mesh()
    method = methods.create(config)
    teacher = teacher_lib.Teacher(trainer.init_variables(teacher_lib.model(config), config.data.image_size, seed=1),
                                  "0" * 64, None)
    batch = next(data.train_batches(config.data, config.data.split, 32, seed=0))
    _, features = teacher_lib.model(config).apply(teacher.variables, batch["image"], train=False)
    alignment = alignment_lib.fit_alignment([np.asarray(features["pre_relu"])])
    _, schedule, tx = trainer.recipe(config, 152)
    state = trainer.create_train_state(distill.initial_variables(config, method, teacher, alignment), tx, mesh, seed=0)
    step = trainer.make_train_step(distill.make_loss_fn(config, method, None), tx, mesh)
    state, metrics = step(state, parallel.shard_batches([batch], mesh, 1), parallel.replicate(np.int32(1), mesh),
                          parallel.replicate((teacher.variables, method.constants(alignment)), mesh))
    assert int(parallel.to_host(state.step)) == 1 and np.isfinite(parallel.to_host(metrics["loss"])).all()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete tiny demo run, shared by the tests that only read its outputs."""
    workdir = tmp_path_factory.mktemp("demo")
    outputs = pipeline.run(tiny_config(), workdir)
    return workdir, outputs


def _copy(workdir, destination, *names):
    destination.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", *(str(workdir / name) for name in names), str(destination)], check=True)
    return destination


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"], row["lr"]) for row in rows if "loss" in row]


@pytest.mark.slow
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
    assert outputs["student_pth"] == str(workdir / "student.pth") and outputs["results"] == results


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert _losses(resumed) == _losses(workdir)


@pytest.mark.slow
def test_distillation_from_the_target_cache_follows_the_online_run(finished_run, tmp_path):
    """The same run with the teacher replaced by its cached targets: float16 targets, the same losses to 1e-2."""
    workdir, _ = finished_run
    cached = _copy(workdir, tmp_path / "cached", "teacher", "alignment.npz")
    pipeline.run(tiny_config(downstream=None, **{"target_cache.enabled": True}), cached)
    assert (cached / "target_cache" / "meta.json").exists()
    np.testing.assert_allclose([loss for _, loss, _ in _losses(cached)], [loss for _, loss, _ in _losses(workdir)],
                               rtol=1e-2)


@pytest.mark.slow
def test_a_finished_run_is_not_repeated(finished_run, caplog):
    workdir, _ = finished_run
    before = (workdir / "student" / "variables.msgpack").read_bytes()
    with caplog.at_level("INFO"):
        pipeline.run(tiny_config(), workdir)
    assert "skipping" in caplog.text
    assert (workdir / "student" / "variables.msgpack").read_bytes() == before


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_and_run_only_fields_are_not_compared(finished_run, tmp_path):
    workdir, _ = finished_run
    with pytest.raises(ConfigError, match="different config.*train.lr: 0.01 there, 0.005 now.*allow_changes=train.lr"
                                          ".*overwrite"):
        pipeline.check_workdir(tiny_config(**{"train.lr": 0.005}), workdir)
    # Logging, checkpointing and reader settings change no result: a resume may change them.
    copy = _copy(workdir, tmp_path / "copy", "config.json", "alignment.npz")
    pipeline.check_workdir(tiny_config(**{"log_every_steps": 7, "keep_checkpoints": 1, "data.threads": 1,
                                          "downstream.eval_batch_size": 4, "teacher.train.log_every_steps": 3}), copy)
    assert json.loads((copy / "config.json").read_text())["log_every_steps"] == 7
    assert pipeline.result_differences({"train": {"lr": 1}, "log_every_steps": 1, "downstream": {"seed": 0}},
                                       {"train": {"lr": 2}, "log_every_steps": 5, "downstream": None}) == [
        ("downstream", {"seed": 0}, None), ("train.lr", 1, 2)]
    # A field added since the run was made, left unset (None: the behaviour before it), is no difference.
    assert pipeline.result_differences({"teacher": {"arch": "resnet50"}},
                                       {"teacher": {"arch": "resnet50", "dtype": None}}) == []
    assert pipeline.result_differences({"teacher": {}}, {"teacher": {"dtype": "bfloat16"}}) == [
        ("teacher.dtype", "<absent>", "bfloat16")]


@pytest.mark.slow
def test_missing_teacher_says_how_to_convert_and_writes_nothing(tmp_path):
    config = tiny_config(**{"teacher.train": None, "teacher.path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="config.teacher.path: no converted checkpoint.*python -m kdep_jax.convert "
                                          "import"):
        pipeline.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_teacher_of_another_architecture_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    # The student (a resnet18) given as a resnet50 teacher.
    config = tiny_config(**{"teacher.train": None, "teacher.path": str(workdir / "student"),
                            "teacher.arch": "resnet50"})
    with pytest.raises(ConfigError, match="holds a resnet18 checkpoint, but the config says resnet50"):
        pipeline.run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_failed_bad_input_does_not_claim_the_workdir(finished_run, tmp_path):
    """A typo fails before anything is written, and the corrected command runs in the same workdir."""
    workdir, _ = finished_run
    teacher = str(workdir / "teacher" / "model")
    run = tmp_path / "run"
    for typo in ({"teacher.path": teacher + "_typo"}, {"data.split": "upstream_trian"}, {"mode": "kdpe"},
                 {"student.arch": "resnet19"}):
        with pytest.raises(ConfigError):
            pipeline.run(tiny_config("tiny_distill", **{"teacher.path": teacher, **typo}), run)
        assert not run.exists(), typo
    with pytest.raises(ConfigError, match="config.init='kdep:typo_dir'"):
        pipeline.run(small_transfer_config(init="kdep:typo_dir"), run)
    assert not run.exists()
    outputs = pipeline.run(tiny_config("tiny_distill", **{"teacher.path": teacher}), run)
    assert (run / "student" / "meta.json").exists() and outputs["student"] == str(run / "student")


@pytest.mark.slow
def test_alignment_of_another_teacher_is_recomputed(finished_run, tmp_path, caplog):
    workdir, _ = finished_run
    alignment, provenance = alignment_lib.load_alignment(workdir / "alignment.npz")
    alignment_lib.save_alignment(tmp_path / "alignment.npz", alignment, {**provenance, "teacher_sha256": "0" * 64})
    config = tiny_config()
    teacher = teacher_lib.load(config, workdir / "teacher" / "model")
    with caplog.at_level("WARNING"):
        recomputed = kdep_method.compute_or_load_alignment(config, tmp_path, parallel.make_mesh(), teacher)
    assert "another teacher or data" in caplog.text and "teacher_sha256" in caplog.text
    _, new_provenance = alignment_lib.load_alignment(tmp_path / "alignment.npz")
    assert new_provenance["teacher_sha256"] == provenance["teacher_sha256"]
    # The same teacher on the same data and seed: the same statistics as the original run's.
    np.testing.assert_allclose(recomputed.singular_values, alignment.singular_values, rtol=1e-6)


@pytest.mark.parametrize("field,value", [("data.data_dir", "/elsewhere"), ("data.subset_seed", 1),
                                         ("data.demo_seed", 1), ("data.min_crop_scale", 0.5),
                                         ("data.skip_corrupt", True), ("dtype", "bfloat16"), ("seed", 1)])
def test_alignment_statistics_are_tied_to_every_data_setting(field, value):
    """A shared config.alignment.path is reused only for the same data, augmentation and dtype."""
    teacher = teacher_lib.Teacher({}, "0" * 64, None)
    assert (kdep_method.alignment_provenance(tiny_config(**{field: value}), teacher)
            != kdep_method.alignment_provenance(tiny_config(), teacher))
    assert (kdep_method.alignment_provenance(tiny_config(**{"data.threads": 3}), teacher)
            == kdep_method.alignment_provenance(tiny_config(), teacher))


@pytest.mark.slow
def test_divergence_keeps_a_finite_checkpoint_and_the_advice_resumes(finished_run, tmp_path):
    """lr 1e30 diverges at once: no checkpoint is kept whose parameters led to it, and the command in the
    message (with a sane lr in place of its suggestion) resumes the same workdir instead of being refused."""
    workdir, _ = finished_run
    teacher = str(workdir / "teacher" / "model")
    student = {"student.width": 0.25}  # a quarter-width student: what is tested here does not depend on its size
    config = tiny_config("tiny_distill", **{"teacher.path": teacher, "train.lr": 1e30, "log_every_steps": 1,
                                            "checkpoint_every_steps": 1, **student})
    run = tmp_path / "run"
    with pytest.raises(trainer.TrainingError, match="loss became nan at or before step 2") as error:
        pipeline.run(config, run)
    message = str(error.value)
    assert "--config.train.lr=1e+29 --config.allow_changes=train.lr" in message
    assert "no checkpoint from before it is left" in message and not (run / "checkpoints" / "1").exists()
    assert not (run / "student").exists()
    pipeline.run(tiny_config("tiny_distill", **{"teacher.path": teacher, "train.lr": 0.02, "log_every_steps": 1,
                                                "checkpoint_every_steps": 1, "allow_changes": "train.lr", **student}),
                 run)
    assert all(np.isfinite(loss) for _, loss, _ in _losses(run)) and (run / "student" / "meta.json").exists()


@pytest.mark.slow
def test_the_summary_lists_only_the_files_written(finished_run, tmp_path, monkeypatch):
    """Without torch the export writes the safetensors file, warns about student.pth and does not list it."""
    workdir, _ = finished_run
    copy = _copy(workdir, tmp_path / "copy", "student")

    def no_torch():
        raise convert.ConversionError("reading and writing .pth files needs PyTorch (No module named 'torch')")

    monkeypatch.setattr(convert, "_import_torch", no_torch)
    outputs = pipeline.export_student(tiny_config(), copy)
    assert (copy / "student.safetensors").exists() and not (copy / "student.pth").exists()
    assert outputs == {"student": str(copy / "student"), "student_safetensors": str(copy / "student.safetensors")}


def test_batches_that_do_not_split_over_the_devices_are_named(tmp_path):
    """3 devices: a train batch of 33 splits, but the eval and alignment batches must too; checked up front."""
    for field, value in (("downstream.eval_batch_size", 32), ("alignment.batch_size", 64),
                         ("teacher.train.eval_batch_size", 256)):
        config = tiny_config(**{"train.batch_size": 33, "teacher.train.train.batch_size": 33,
                                "downstream.train.batch_size": 33, "downstream.eval_batch_size": 33,
                                "teacher.train.eval_batch_size": 33, "alignment.batch_size": 33, field: value})
        with pytest.raises(ConfigError, match=f"config.{field}={value} does not split evenly over the 3 devices"):
            validation.validate(config, 3, 1, tmp_path)


def test_bfloat16_on_a_cpu_is_warned_about_where_it_is_slower(tmp_path, caplog, monkeypatch):
    """XLA:CPU runs bfloat16 convolutions and dots more slowly than float32 ones: say so, without refusing; on a CPU
    with AMX tiles, where kdep_jax's kernels run a ResNet's convs, only for a teacher of another kind."""
    monkeypatch.setattr(xla_flags, "amx_bf16", lambda: False)
    validation.validate(tiny_config(), 4, 1, tmp_path)
    assert "bfloat16" not in caplog.text
    validation.validate(tiny_config(dtype="bfloat16"), 4, 1, tmp_path)
    assert "config.dtype='bfloat16' on a CPU without AMX tiles" in caplog.text
    caplog.clear()
    monkeypatch.setattr(xla_flags, "amx_bf16", lambda: True)
    validation.validate(tiny_config(dtype="bfloat16"), 4, 1, tmp_path)
    assert "bfloat16" not in caplog.text
    swin_teacher = {"teacher.arch": "swin_t", "teacher.train.model.arch": "swin_t"}
    validation.validate(tiny_config(dtype="bfloat16", **swin_teacher), 4, 1, tmp_path)
    assert "A swin_t teacher in bfloat16 on a CPU" in caplog.text
    caplog.clear()
    validation.validate(tiny_config(dtype="bfloat16", **swin_teacher, **{"teacher.dtype": "float32"}), 4, 1, tmp_path)
    assert "teacher in bfloat16" not in caplog.text


def test_the_target_cache_needs_a_local_directory_and_random_access(tmp_path):
    config = tiny_config(**{"target_cache.enabled": True})
    with pytest.raises(ConfigError, match="needs a local disk, not gs://bucket/run/target_cache"):
        validation.validate(config, 4, 1, "gs://bucket/run")
    validation.validate(config, 4, 1, tmp_path)
    # A TFDS dataset stored as TFRecord is refused before the alignment pass, not after it.
    TinyImages(data_dir=str(tmp_path / "tfds"), file_format="tfrecord").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    config.data.update(name="tiny_images", data_dir=str(tmp_path / "tfds"), split="train", subset=None)
    config.train.batch_size = config.alignment.batch_size = 4
    with pytest.raises(ConfigError, match="target_cache.enabled=True needs random access.*stored as TFRecord"):
        validation.validate(config, 4, 1, tmp_path)


def _cli(tmp_path, *args, code=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, *(["-c", code] if code else ["-m", "kdep_jax.main"]), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_cli_reports_bad_config_override_and_errors(tmp_path):
    bad_key = _cli(tmp_path, "--config=configs/demo.py:tiny", f"--workdir={tmp_path}", "--config.train.lrr=1")
    assert bad_key.returncode == 2 and "Traceback" not in bad_key.stderr
    assert 'names a field the config does not have: \'lrr\' Did you mean "lr"' in bad_key.stderr
    missing_teacher = _cli(tmp_path, "--config=configs/r18.py", f"--workdir={tmp_path / 'r18'}",
                           f"--config.teacher.path={tmp_path / 'none'}")
    assert missing_teacher.returncode == 2
    assert "no converted checkpoint" in missing_teacher.stderr and "Traceback" not in missing_teacher.stderr
    no_decay = _cli(tmp_path, "--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'decay'}",
                    "--config.train.lr_decay_every_epochs=0")
    assert no_decay.returncode == 2 and "config.train.lr_decay_every_epochs=0" in no_decay.stderr
    assert "Traceback" not in no_decay.stderr and not (tmp_path / "decay").exists()
    # A bug (here: a ValueError from inside the pipeline) is not a user error: its traceback is kept.
    bug = _cli(tmp_path, "--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'bug'}", code=(
        "import sys; from kdep_jax import main, pipeline\n"
        "def run(config, workdir): raise ValueError('an internal error')\n"
        "pipeline.run = run; sys.argv[0] = 'kdep_jax.main'; main.run()"))
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: an internal error" in bug.stderr


def test_every_config_loads_without_importing_a_framework():
    """`--config=configs/...` parses without TensorFlow, JAX or torch (configs import only ml_collections and
    kdep_jax.config_lib), and every config names a known method, schedule and optimiser."""
    code = ("import glob, json, runpy, sys\n"
            "loaded = {path: runpy.run_path(path)['get_config']() for path in sorted(glob.glob('configs/**/*.py', "
            "recursive=True))}\n"
            "print(json.dumps({'frameworks': [m for m in ('tensorflow', 'jax', 'torch', 'flax') if m in sys.modules],"
            " 'configs': {p: [c.get('method'), c.train.schedule, c.train.optimizer] for p, c in loaded.items()}}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["frameworks"] == []
    assert len(report["configs"]) >= 12
    for path, (method, schedule, optimizer) in report["configs"].items():
        assert method in (None, *methods.METHODS), path
        assert schedule in ("step", "cosine") and optimizer in ("sgd", "adamw"), path
