"""The stages of a run, in order, each skipped when its output is already in the workdir.

KDEP: (the demo's teacher training) -> alignment statistics -> distillation -> export of the student
-> (transfer runs listed in `config.downstream`). Transfer configs run the transfer stage alone.
Rerunning the same command resumes where the last run stopped.
"""
from __future__ import annotations

import json
import logging

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from kdep_jax import convert, distill, parallel, supervised

_OUTPUTS = ("checkpoints", "metrics.jsonl", "alignment.npz", "student", "student.pth", "student.safetensors",
            "teacher", "transfer_kdep", "transfer_scratch", "results.json", "config.json")


def check_workdir(config, workdir: epath.Path) -> None:
    """Refuses to mix two experiments in one workdir, unless told to start over."""
    saved = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    current.pop("overwrite", None)
    if saved.exists():
        previous = json.loads(saved.read_text())
        previous.pop("overwrite", None)
        if previous != current:
            if not config.overwrite:
                changed = sorted(_diff(previous, current))
                raise ValueError(
                    f"{workdir} holds a run of a different config (differences: {', '.join(changed[:8])}). Use "
                    f"another --workdir, or pass --config.overwrite=True to delete that run's outputs and start over.")
            if jax.process_index() == 0:
                logging.warning("config.overwrite=True: deleting the previous run's outputs in %s.", workdir)
                for name in _OUTPUTS:
                    path = workdir / name
                    if path.is_dir():
                        path.rmtree()
                    elif path.exists():
                        path.unlink()
                for events in workdir.glob("events.out.tfevents.*"):
                    events.unlink()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        # Atomically: the other processes of a multi-process run may be reading it.
        tmp = saved.parent / (saved.name + ".tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(saved)
    if jax.process_count() > 1:  # no process looks at the workdir before process 0 has set it up
        multihost_utils.sync_global_devices("kdep_jax.pipeline.check_workdir")


def _diff(a, b, prefix=""):
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            yield f"{prefix}{key}"


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs every stage the config asks for; returns where the outputs are."""
    workdir = epath.Path(workdir)
    check_workdir(config, workdir)
    mesh = parallel.make_mesh()
    logging.info("%d devices on %d processes; global batch sharded over the 'data' axis.", jax.device_count(),
                 jax.process_count())
    if config.mode == "transfer":
        return {"results": transfer(config, workdir, mesh)}
    if config.mode != "kdep":
        raise ValueError(f"config.mode={config.mode!r}: expected 'kdep' or 'transfer'.")
    outputs = {"workdir": str(workdir)}
    teacher_dir = config.teacher.path
    if config.teacher.train is not None:
        teacher_dir = train_teacher(config, workdir / "teacher", mesh)
    student_dir = workdir / "student"
    if (student_dir / "meta.json").exists():
        logging.info("The distilled student is already in %s; skipping distillation.", student_dir)
    else:
        teacher_variables, teacher_sha256 = distill.load_teacher(config, teacher_dir)
        distill.student_dim(config)  # a student wider than the teacher fails before any work
        alignment = distill.compute_or_load_alignment(config, workdir, mesh, teacher_variables, teacher_sha256)
        result = distill.distill(config, workdir, mesh, teacher_variables, alignment, teacher_sha256)
        if result.preempted:
            return {**outputs, "preempted": True}
        export_student(config, workdir, parallel.to_host({"params": result.state.params,
                                                           "batch_stats": result.state.batch_stats}))
    outputs.update(student=str(student_dir), student_pth=str(workdir / "student.pth"))
    if config.downstream is not None:
        outputs["results"] = [row for init in (f"kdep:{workdir}", "scratch")
                              for row in transfer(_with_init(config.downstream, init),
                                                  workdir / f"transfer_{init.partition(':')[0]}", mesh)]
        _write_results(workdir / "results.json", outputs["results"])
    return outputs


def train_teacher(config, teacher_workdir: epath.Path, mesh) -> epath.Path:
    """The demo's teacher: nothing can be downloaded here, so it is trained on the upstream split first."""
    model_dir = teacher_workdir / "model"
    if (model_dir / "meta.json").exists():
        logging.info("The teacher is already trained (%s); skipping its training.", model_dir)
        return model_dir
    teacher_config = config.teacher.train
    if (teacher_config.model.arch, teacher_config.model.width) != (config.teacher.arch, config.teacher.width):
        raise ValueError("config.teacher.train.model must be the teacher's architecture and width "
                         f"({config.teacher.arch}, {config.teacher.width}).")
    result = supervised.train(teacher_config, teacher_workdir, mesh)
    if result.preempted:
        raise SystemExit(0)
    if jax.process_index() == 0:
        variables = parallel.to_host({"params": result.state.params, "batch_stats": result.state.batch_stats})
        convert.save_converted(model_dir, variables, config.teacher.arch, source=f"trained in {teacher_workdir}")
    return model_dir


def export_student(config, workdir: epath.Path, variables) -> None:
    """The student in the converted form (for transfer here) and as torchvision state dicts (for PyTorch)."""
    if jax.process_index() != 0:
        return
    convert.save_converted(workdir / "student", variables, config.student.arch, source=f"KDEP run in {workdir}")
    state_dict = convert.to_torchvision(variables, config.student.arch)
    convert.write_state_dict(state_dict, workdir / "student.safetensors")
    try:
        convert.write_state_dict(state_dict, workdir / "student.pth")
    except convert.ConversionError as error:  # torch is not installed: the safetensors file is there
        logging.warning("Skipped student.pth: %s", error)
    logging.info("Student exported to %s (torchvision key names).", workdir)


def transfer(config, workdir: epath.Path, mesh) -> list[dict]:
    """Fine-tunes (or linear-probes) from `config.init`; returns and records the result row."""
    backbone, init_tag = supervised.load_backbone(config.init, config.model.arch, config.model.width)
    run = {"init": config.init.partition(":")[0], "source": init_tag, "dataset": config.data.name,
           "arch": config.model.arch, "linear_probe": bool(config.linear_probe), "seed": config.seed,
           "epochs": config.train.num_epochs}
    results_path = workdir / "results.json"
    if results_path.exists():
        rows = json.loads(results_path.read_text())
        _check_same_run(results_path, rows, run)
        logging.info("Transfer results already in %s; skipping.", results_path)
        return rows
    result = supervised.train(config, workdir, mesh, backbone=backbone)
    if result.preempted:
        raise SystemExit(0)
    row = {**run, "top1": result.last_eval["eval_top1"], "top5": result.last_eval["eval_top5"]}
    _write_results(results_path, [row])
    return [row]


def _check_same_run(path: epath.Path, rows, run: dict) -> None:
    """A results.json left by another run (another init, student, dataset, seed...) is refused, not returned."""
    stored = rows[0] if isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], dict) else {}
    differences = [f"{key}: {stored.get(key)!r} there, {value!r} here" for key, value in run.items()
                   if stored.get(key) != value]
    if differences:
        raise ValueError(f"{path} holds the result of another run ({'; '.join(differences)}). Delete it (and the "
                         f"checkpoints/ next to it) to run this transfer there, or use another --workdir.")


def _with_init(config, init: str):
    config = config.copy_and_resolve_references()
    config.init = init
    return config


def _write_results(path: epath.Path, rows: list[dict]) -> None:
    if jax.process_index() == 0:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(path)
