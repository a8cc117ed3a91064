"""Transfer: the backbone is loaded and the head is new, linear probing trains the head alone, evaluation
counts every example once on any number of devices, the report's table, and each bad input."""
import csv
import io
import json
import math
import re

import jax
import numpy as np
import optax
import pytest
import torch
import torchvision
from etils import epath
from flax import traverse_util

from kdep_jax import convert, data, faults, models, parallel, pipeline, report, supervised, trainer
from conftest import small_transfer_config

NUM_CLASSES = 10  # the demo's downstream task
TEST_SIZE = 500  # demo downstream_test: 10 classes x 50 images


def flat(variables, collection):
    return traverse_util.flatten_dict(variables[collection])


def shaped_like_model(arch, width, num_classes):
    """Random variables of a model's structure, without running (or compiling) an init: for name, shape and
    copy checks, where no forward pass is made."""
    model = models.create_model(arch, num_classes=num_classes, width=width)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def fresh():
    """The variables supervised.train starts from for small_transfer_config() before a backbone is attached."""
    config = small_transfer_config()
    return trainer.init_variables(supervised.create_model(config, NUM_CLASSES), 32, config.seed)


@pytest.fixture(scope="module")
def student(tmp_path_factory, fresh):
    """A KDEP-like workdir holding a headless student: the fresh backbone, every value moved a little (so a
    loaded value cannot be mistaken for a fresh one) but still a sane network to train on."""
    workdir = tmp_path_factory.mktemp("kdep_run")
    rng = np.random.default_rng(0)
    variables = {"params": {name: value for name, value in fresh["params"].items() if name != "fc"},
                 "batch_stats": fresh["batch_stats"]}
    variables = jax.tree.map(lambda x: (x + rng.uniform(0.01, 0.1, x.shape)).astype(np.float32), variables)
    meta = convert.save_converted(workdir / "student", variables, "resnet18", source="test")
    return workdir, variables, meta


def test_kdep_backbone_is_loaded_and_the_head_is_new(student, fresh):
    workdir, source, meta = student
    backbone, tag = supervised.load_backbone(f"kdep:{workdir}", "resnet18", 0.25)
    assert tag == f"kdep:{meta['sha256'][:12]}"
    merged = supervised.attach_backbone(fresh, backbone, supervised.backbone_shapes(small_transfer_config()))
    for collection in ("params", "batch_stats"):
        merged_flat, source_flat = flat(merged, collection), flat(source, collection)
        head = {key for key in merged_flat if key[0] == "fc"}
        assert set(merged_flat) - head == set(source_flat)
        for key, value in source_flat.items():
            np.testing.assert_array_equal(merged_flat[key], value, err_msg=str(key))
    assert merged["params"]["fc"]["kernel"].shape == (128, NUM_CLASSES)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(merged["params"]["fc"][name], fresh["params"]["fc"][name])


def test_torchvision_backbone_is_loaded_and_the_head_is_new(tmp_path):
    """Against torchvision itself: its 1000-class fc is dropped, every backbone tensor arrives (OIHW -> HWIO)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    config = small_transfer_config()
    config.model.width = 1.0
    backbone, tag = supervised.load_backbone(f"torchvision:{tmp_path / 'r18.pth'}", "resnet18")
    assert tag == "torchvision:r18.pth"
    new = shaped_like_model("resnet18", 1.0, NUM_CLASSES)
    merged = supervised.attach_backbone(new, backbone, supervised.backbone_shapes(config))
    state = {key: value.numpy() for key, value in model.state_dict().items()}
    np.testing.assert_array_equal(merged["params"]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(merged["params"]["layer4_1"]["conv2"]["kernel"],
                                  state["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(merged["batch_stats"]["layer3_0"]["downsample_1"]["mean"],
                                  state["layer3.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(merged["batch_stats"]["bn1"]["var"], state["bn1.running_var"])
    assert merged["params"]["fc"]["kernel"].shape == (512, NUM_CLASSES)
    np.testing.assert_array_equal(merged["params"]["fc"]["kernel"], new["params"]["fc"]["kernel"])


def test_linear_probe_changes_only_the_head(student, fresh, tmp_path):
    workdir, source, _ = student
    config = small_transfer_config(linear_probe=True)
    backbone, _ = supervised.load_backbone(f"kdep:{workdir}", "resnet18", 0.25)
    result = supervised.train(config, tmp_path, parallel.make_mesh(), backbone=backbone)
    trained = parallel.to_host({"params": result.state.params, "batch_stats": result.state.batch_stats})
    for collection in ("params", "batch_stats"):
        for key, value in flat(source, collection).items():
            np.testing.assert_array_equal(flat(trained, collection)[key], value, err_msg=str(key))
    assert int(result.state.step) == 2
    for name in ("kernel", "bias"):
        assert not np.array_equal(trained["params"]["fc"][name], fresh["params"]["fc"][name])
    assert result.last_eval["eval_count"] == TEST_SIZE


def test_evaluation_counts_each_example_once_on_1_and_4_devices(fresh):
    config = small_transfer_config()
    model = supervised.create_model(config, NUM_CLASSES)
    assert TEST_SIZE % config.eval_batch_size != 0
    # Reference: the whole split in one unsharded, unpadded batch, scored in numpy.
    (batch,) = data.eval_batches(config.data, "downstream_test", TEST_SIZE)
    logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(fresh, batch["image"])
    expected_top1 = 100.0 * np.mean(np.argmax(np.asarray(logits), -1) == batch["label"])
    for num_devices in (1, 4):
        mesh = parallel.make_mesh(jax.devices()[:num_devices])
        state = trainer.create_train_state(fresh, optax.identity(), mesh, seed=0)
        metrics = supervised.make_evaluator(model, config.data, "downstream_test", config.eval_batch_size, mesh)(state)
        assert metrics["eval_count"] == TEST_SIZE, num_devices
        # Batch shapes differ from the reference, so allow one near-tied argmax to flip (0.2% of 500).
        assert metrics["eval_top1"] == pytest.approx(expected_top1, abs=100.0 / TEST_SIZE), num_devices


def write_run(directory, rows, curve=None):
    """A run directory as the transfer stage leaves it: results.json, and metrics.jsonl with eval points."""
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(rows))
    if curve:
        (directory / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_top1": t}) + "\n"
                                                         for s, t in curve))
    return directory


def kdep_row(dataset, seed, top1, **extra):
    return {"init": "kdep", "source": "kdep:abc123", "arch": "resnet18", "dataset": dataset, "seed": seed,
            "top1": top1, **extra}


@pytest.fixture
def report_runs(tmp_path):
    """A demo workdir (two rows), two more KDEP seeds/datasets with a curve, and a linear probe."""
    scratch = {"init": "scratch", "source": "scratch", "arch": "resnet18", "dataset": "cifar100", "seed": 0,
               "top1": 50.0}
    return [write_run(tmp_path / "demo", [kdep_row("cifar100", 0, 70.0), scratch]),
            write_run(tmp_path / "seed1", [kdep_row("cifar100", 1, 72.0)], curve=[(10, 65.0), (20, 72.0)]),
            write_run(tmp_path / "dtd", [kdep_row("dtd", 0, 60.0)]),
            write_run(tmp_path / "probe", [kdep_row("cifar100", 0, 40.0, linear_probe=True)])]


def test_report_aggregates_hand_written_rows(report_runs, tmp_path, capsys):
    table = report.summarize(report.gather_rows(report_runs))
    assert table.datasets == ["cifar100", "dtd"]
    kdep, scratch, probe = table.rows
    assert kdep.cells["cifar100"].mean == pytest.approx(71.0)
    assert kdep.cells["cifar100"].std == pytest.approx(math.sqrt(2.0))  # sample std of 70 and 72
    assert kdep.cells["cifar100"].count == 2 and kdep.cells["dtd"].count == 1
    assert kdep.average == pytest.approx((71.0 + 60.0) / 2)
    assert scratch.average is None and probe.average is None  # no dtd run: no average

    output = tmp_path / "report"
    assert report.main([*map(str, report_runs), "--output", str(output)]) == 0
    markdown = (output / "results.md").read_text()
    assert capsys.readouterr().out == markdown
    assert markdown.splitlines() == [
        "| init | cifar100 | dtd | average |",
        "|---|---:|---:|---:|",
        "| kdep:abc123 · resnet18 | 71.00 ± 1.41 (n=2) | 60.00 (n=1) | 65.50 |",
        "| scratch · resnet18 | 50.00 (n=1) | – | – |",
        "| kdep:abc123 · resnet18 · linear probe | 40.00 (n=1) | – | – |",
    ]
    rows = list(csv.DictReader(io.StringIO((output / "results.csv").read_text())))
    assert [row["init"] for row in rows] == ["kdep:abc123 · resnet18", "scratch · resnet18",
                                             "kdep:abc123 · resnet18 · linear probe"]
    assert float(rows[0]["cifar100"]) == pytest.approx(71.0)
    assert float(rows[0]["cifar100 std"]) == pytest.approx(math.sqrt(2.0))
    assert rows[0]["cifar100 n"] == "2" and rows[0]["dtd std"] == ""
    assert float(rows[0]["average"]) == pytest.approx(65.5) and rows[1]["average"] == ""
    curve = ("kdep:abc123 · resnet18 · cifar100 · seed 1", [(10, 65.0), (20, 72.0)])
    assert report.curve_runs(report_runs) == [curve]  # only seed1 logged eval points
    assert (output / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_report_refuses_the_same_run_twice(report_runs):
    with pytest.raises(report.ReportError, match="pass each run once"):
        report.gather_rows([report_runs[1], report_runs[1]])


@pytest.mark.parametrize("content", ['{"init": "kdep", "dataset": "dtd", "top1": 1.0}',
                                     '[{"init": "kdep", "dataset": "dtd"}]',
                                     '[{"init": "kdep", "dataset": "dtd", "top1": "high"}]',
                                     "[]", "not json", None])
def test_report_names_a_bad_results_file(tmp_path, content, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "results.json").write_text(content)
    with pytest.raises(report.ReportError, match=re.escape(str(run / "results.json"))):
        report.gather_rows([run])
    assert report.main([str(run)]) == 2
    assert "results.json" in capsys.readouterr().err


@pytest.mark.parametrize("init", ["kdep:{tmp}/nowhere", "torchvision:{tmp}/nowhere.pth"])
def test_missing_init_path_is_named(tmp_path, init):
    init = init.format(tmp=tmp_path)
    with pytest.raises(convert.ConversionError, match=re.escape(f"config.init={init!r}")):
        supervised.load_backbone(init, "resnet18", 0.25)


def test_init_of_another_architecture_is_refused(tmp_path):
    resnet34 = shaped_like_model("resnet34", 0.25, None)
    convert.save_converted(tmp_path / "r34", resnet34, "resnet34")
    with pytest.raises(convert.ConversionError, match="config.init=.*resnet34.*resnet18"):
        supervised.load_backbone(f"kdep:{tmp_path / 'r34'}", "resnet18", 0.25)
    convert.write_state_dict(convert.to_torchvision(resnet34, "resnet34"), tmp_path / "r34.safetensors")
    with pytest.raises(convert.ConversionError, match="config.init=.*not a resnet18"):
        supervised.load_backbone(f"torchvision:{tmp_path / 'r34.safetensors'}", "resnet18", 0.25)


def test_init_of_another_width_is_refused(student):
    workdir, _, _ = student
    config = small_transfer_config()
    config.model.width = 0.5
    backbone, _ = supervised.load_backbone(f"kdep:{workdir}", "resnet18", 0.5)
    with pytest.raises(convert.ConversionError, match="has shape .* another architecture or width"):
        supervised.attach_backbone(shaped_like_model("resnet18", 0.5, NUM_CLASSES), backbone,
                                   supervised.backbone_shapes(config))


def test_results_of_this_run_are_returned_and_of_another_run_refused(tmp_path, student):
    """A finished run's results.json is returned without training again; another run's is refused, naming
    what differs. The file is the row a scratch run of small_transfer_config() writes (the documented format)."""
    workdir = epath.Path(tmp_path)
    rows = [{"init": "scratch", "source": "scratch", "dataset": "demo", "arch": "resnet18", "linear_probe": False,
             "seed": 0, "epochs": 1, "top1": 31.0, "top5": 80.0}]
    (workdir / "results.json").write_text(json.dumps(rows))
    mesh = parallel.make_mesh()
    assert pipeline.transfer(small_transfer_config(), workdir, mesh) == rows  # done: not trained again
    assert not (workdir / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"results.json holds the result of another run \(seed: 0 there, 1 here\)"):
        pipeline.transfer(small_transfer_config(seed=1), workdir, mesh)
    with pytest.raises(ValueError, match="init: 'scratch' there, 'kdep' here; source: 'scratch' there, 'kdep:"):
        pipeline.transfer(small_transfer_config(init=f"kdep:{student[0]}"), workdir, mesh)


def test_a_transfer_preempted_at_its_last_step_completes_on_rerun(tmp_path, monkeypatch):
    """A SIGTERM during the last step saves it and stops the run (the scheduler wants the machine back); the rerun
    evaluates the final checkpoint and writes the row an uninterrupted run writes, and does so again after losing
    results.json."""
    config = small_transfer_config()
    mesh = parallel.make_mesh()
    expected = pipeline.transfer(config, tmp_path / "reference", mesh)
    monkeypatch.setenv(faults.ENV, "transfer.step:SIGTERM:2")  # a real SIGTERM to this process in the last step
    with pytest.raises(pipeline.Preempted):
        pipeline.transfer(config, tmp_path / "run", mesh)
    monkeypatch.delenv(faults.ENV)
    assert not (tmp_path / "run" / "results.json").exists()
    assert pipeline.transfer(config, tmp_path / "run", mesh) == expected
    (tmp_path / "run" / "results.json").unlink()
    assert pipeline.transfer(config, tmp_path / "run", mesh) == expected
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == expected


def test_mobilenet_v2_fine_tuning_uses_torchvision_dropout():
    """torchvision's MobileNetV2 classifier is Dropout(p=0.2) + Linear: the training loss draws a new mask from each
    step's key, and the logits' mean and variance over masks are those of that dropout."""
    config = small_transfer_config(**{"model.arch": "mobilenet_v2", "model.width": 0.35})
    model = supervised.create_model(config, NUM_CLASSES)
    variables = trainer.init_variables(model, 64, seed=0)
    # 8 images of 64 px: train-mode BatchNorm of the last 2x2 maps is well conditioned (at 1x1 and 2 images each
    # channel is normalised from 2 values, and rounding flips the ReLU6 outputs between programs).
    images = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
    batch = {"image": images, "label": np.arange(8) % NUM_CLASSES}
    loss_fn = jax.jit(supervised.make_loss_fn(model, linear_probe=False))
    losses = [float(loss_fn(variables["params"], variables["batch_stats"], batch, (), jax.random.key(seed))[0])
              for seed in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]

    def logits(key):
        return model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0][0]

    samples = np.asarray(jax.jit(jax.vmap(logits))(jax.random.split(jax.random.key(0), 400)), np.float64)
    (_, features), _ = jax.jit(lambda: model.apply(variables, images, train=True, mutable=["batch_stats"]))()
    pooled = np.asarray(features["pooled"], np.float64)
    kernel, bias = (np.asarray(variables["params"]["classifier_1"][name], np.float64) for name in ("kernel", "bias"))
    variance = (pooled**2) @ (kernel**2) * 0.2 / 0.8  # each feature kept with p=0.8 and scaled by 1/0.8
    np.testing.assert_array_less(np.abs(samples.mean(0) - (pooled @ kernel + bias)), 5 * np.sqrt(variance / 400))
    np.testing.assert_allclose(samples.var(0), variance, rtol=0.3)


def test_report_keeps_runs_of_other_budgets_apart(tmp_path):
    runs = [write_run(tmp_path / f"r{epochs}", [kdep_row("dtd", 0, top1, epochs=epochs)])
            for epochs, top1 in ((150, 60.0), (30, 40.0))]
    table = report.summarize(report.gather_rows(runs))
    assert [row.label for row in table.rows] == ["kdep:abc123 · resnet18 · 150 epochs",
                                                 "kdep:abc123 · resnet18 · 30 epochs"]
    assert [row.cells["dtd"].count for row in table.rows] == [1, 1]
