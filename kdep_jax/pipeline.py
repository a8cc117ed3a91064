"""The stages of a run, in order, each skipped when its output is already in the workdir.

KDEP: (the teacher: config.teacher.checkpoint converted, or the demo's teacher trained) -> alignment statistics
-> distillation -> export of the student -> (transfer runs listed in `config.downstream`) -> results.json.
Transfer configs run the transfer stage alone. Rerunning the same command resumes where the last run stopped,
whatever stopped it: every output is written atomically, and a stage whose output is missing runs again.
"""
from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
from etils import epath

from kdep_jax import convert, data, distill, faults, methods, parallel, supervised, validation
from kdep_jax import teacher as teacher_lib
from kdep_jax.errors import ConfigError

# What a run writes into its workdir (a comparison: a workdir per method, and scratch's runs).
_OUTPUTS = ("checkpoints", "metrics.jsonl", "alignment.npz", "tcs_coordinates.npz", "student", "student.pth",
            "student.safetensors", "teacher", "target_cache", "transfer_kdep", "transfer_scratch", "results.json",
            "comparison.md", "scratch", *methods.METHODS)

# Fields that change how a run is carried out, not what it computes: a resume may change them freely.
# Matched at any depth ("downstream.log_every_steps" too).
RUN_ONLY_FIELDS = ("log_every_steps", "steps_per_call", "checkpoint_every_steps", "checkpoint_every_secs",
                   "keep_checkpoints", "eval_batch_size", "data.threads", "overwrite", "allow_changes")


class Preempted(Exception):
    """A stage stopped after a SIGTERM, with its checkpoint saved; the rerun resumes it."""


def _run_only(field: str) -> bool:
    return any(field == name or field.endswith("." + name) for name in RUN_ONLY_FIELDS)


def result_differences(previous: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, value there, value now) for the fields of two configs' JSON that differ and can change a
    result; a section set on one side and None on the other is one difference."""
    differences = []
    for key in sorted(set(previous) | set(current)):
        field = prefix + key
        there, now = previous.get(key, "<absent>"), current.get(key, "<absent>")
        if _run_only(field) or (there == "<absent>" and now is None):  # a field added since, unset: as before
            continue
        if isinstance(there, dict) and isinstance(now, dict):
            differences += result_differences(there, now, field + ".")
        elif there != now:
            differences.append((field, there, now))
    return differences


def _shown(value) -> str:
    return "a config section" if isinstance(value, dict) else repr(value)


def check_workdir(config, workdir: epath.Path) -> None:
    """Refuses to mix two experiments in one workdir, unless told to start over or to resume with named changes.

    A workdir whose earlier attempt left no output (it failed before its first stage wrote anything) is not a
    run yet: its config is simply replaced.
    """
    saved = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if saved.exists():
        differences = result_differences(json.loads(saved.read_text()), current)
        changed = [field for field, _, _ in differences]
        allowed = {name.strip() for name in config.allow_changes.split(",") if name.strip()}
        outputs = [name for name in _OUTPUTS if (workdir / name).exists()]
        described = [f"{field}: {_shown(there)} there, {_shown(now)} now" for field, there, now in differences]
        if changed and config.overwrite:
            if jax.process_index() == 0:
                logging.warning("config.overwrite=True: deleting the previous run's outputs in %s.", workdir)
                for name in outputs:
                    path = workdir / name
                    path.rmtree() if path.is_dir() else path.unlink()
                for events in workdir.glob("events.out.tfevents.*"):
                    events.unlink()
        elif changed and not outputs:
            logging.info("%s holds the config of an attempt that wrote nothing; replacing it.", workdir)
        elif changed and set(changed) <= allowed:
            logging.warning("Resuming the run in %s with changed %s (config.allow_changes); the stages still to run "
                            "use the new values.", workdir, "; ".join(described))
        elif changed:
            not_allowed = [field for field in changed if field not in allowed]
            raise ConfigError(
                f"{workdir} holds a run of a different config ({'; '.join(described[:8])}). Use another --workdir; "
                f"or resume this run with the new values for what has not run yet: --config.allow_changes="
                f"{','.join(not_allowed)}; or delete that run's outputs and start over: --config.overwrite=True.")
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        # Atomically: the other processes of a multi-process run may be reading it.
        tmp = saved.parent / (saved.name + ".tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(saved)
    parallel.sync("kdep_jax.pipeline.check_workdir")  # no process looks at the workdir before it is set up


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs every stage the config asks for; returns where the outputs are.

    The config is checked against the devices and its inputs first, so a bad setting fails before anything
    is written (`validation.validate`).
    """
    workdir = epath.Path(workdir)
    mesh = parallel.make_mesh()
    validation.validate(config, mesh.size, jax.process_count(), workdir)
    check_workdir(config, workdir)
    logging.info("%d devices on %d processes; global batch sharded over the 'data' axis.", jax.device_count(),
                 jax.process_count())
    try:
        if config.mode == "transfer":
            return {"results": transfer(config, workdir, mesh)}
        if config.mode == "compare":
            return compare(config, workdir, mesh)
        return _kdep(config, workdir, mesh)
    except Preempted:
        return {"workdir": str(workdir), "preempted": True}


def _kdep(config, workdir: epath.Path, mesh) -> dict:
    outputs = {"workdir": str(workdir)}
    teacher_dir = prepare_teacher(config, workdir, mesh)
    student_dir = workdir / convert.STUDENT_SUBDIR
    if (student_dir / convert.META_FILE).exists():
        logging.info("The distilled student is already in %s; skipping distillation.", student_dir)
        student = None
    else:
        method = methods.create(config)
        teacher = teacher_lib.load(config, teacher_dir)
        faults.point("stage.statistics")
        statistics = method.statistics(workdir, mesh, teacher)
        result = distill.distill(config, workdir, mesh, teacher, method, statistics)
        if result.preempted:
            raise Preempted
        student = distill.exported_student(config, method, result.state)
    faults.point("stage.export")
    outputs.update(export_student(config, workdir, student))
    if config.downstream is not None:
        rows = []
        for init in (f"kdep:{workdir}", "scratch"):
            kind = init.partition(":")[0]
            faults.point(f"stage.transfer_{kind}")
            rows += transfer(_with_init(config.downstream, init), workdir / f"transfer_{kind}", mesh,
                             field_prefix="downstream.")
        faults.point("stage.results")
        _write_results(workdir / "results.json", rows)
        faults.point("results.written")
        outputs["results"] = rows
    return outputs


def compare(config, workdir: epath.Path, mesh) -> dict:
    """One student per method of `config.compare.methods`, all from the same teacher (trained or converted once),
    data, budget and seed, each fine-tuned downstream with every seed of `config.compare.seeds`, beside a network
    trained from scratch with the same seeds; writes results.json and comparison.md (`report.comparison_table`)."""
    from kdep_jax import report  # matplotlib, only here

    teacher_path = str(prepare_teacher(config, workdir, mesh))
    rows, pretraining = [], {}
    steps_per_epoch = data.dataset_info(config.data, config.data.split).num_examples // config.train.batch_size
    for name in method_names(config):
        record = workdir / name / "pretraining.json"
        start = time.monotonic()
        try:
            _kdep(method_config(config, name, teacher_path), workdir / name, mesh)
        finally:  # a stopped attempt's time counts too: the record is the whole cost of a resumed stage
            _add_seconds(record, time.monotonic() - start)
        if jax.process_index() == 0:  # the process that keeps the record
            images = steps_per_epoch * config.train.num_epochs * config.train.batch_size
            pretraining[name] = {**json.loads(record.read_text()), "images": images}
    inits = {name: f"kdep:{workdir / name}" for name in method_names(config)} | {"scratch": "scratch"}
    for init_name, init in inits.items():
        for seed in compare_seeds(config):
            downstream = _with_init(config.downstream, init, init_name)
            downstream.seed = seed
            run_rows = transfer(downstream, workdir / init_name / f"transfer_seed{seed}", mesh,
                                field_prefix="downstream.")
            rows += [{**row, "method": init_name} for row in run_rows]
    _write_results(workdir / "results.json", rows)
    if jax.process_index() == 0:
        table = report.comparison_table(rows, pretraining)
        (workdir / "comparison.md").write_text(table)
        print(table)
    return {"workdir": str(workdir), "results": rows, "comparison": str(workdir / "comparison.md")}


def method_names(config) -> list[str]:
    return [name.strip() for name in config.compare.methods.split(",") if name.strip()]


def compare_seeds(config) -> list[int]:
    return [int(seed) for seed in config.compare.seeds.split(",") if seed.strip()]


def method_config(config, name: str, teacher_path: str):
    """The KDEP-mode config of one method of a comparison: its own workdir, the shared teacher, no transfer."""
    config = config.copy_and_resolve_references()
    config.mode, config.method = "kdep", name
    config.teacher.path, config.teacher.checkpoint, config.teacher.train = teacher_path, "", None
    config.downstream = None
    return config


def _add_seconds(path: epath.Path, seconds: float) -> None:
    """Adds an attempt's wall time to the JSON record at path, on process 0 (the only one that reads it)."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0}
        record["seconds"] += seconds
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)


def prepare_teacher(config, workdir: epath.Path, mesh) -> epath.Path:
    """The converted teacher's directory (teacher_lib.directory): config.teacher.path as it is, or
    config.teacher.checkpoint converted, or a teacher trained, into WORKDIR/teacher/model, once."""
    model_dir = teacher_lib.directory(config, workdir)
    if config.teacher.train is not None:
        faults.point("stage.teacher")
        return train_teacher(config, model_dir.parent, mesh)
    if config.teacher.checkpoint:
        faults.point("stage.teacher")
        return convert_teacher(config, model_dir)
    return model_dir


def convert_teacher(config, model_dir: epath.Path) -> epath.Path:
    """config.teacher.checkpoint converted into model_dir on process 0, atomically (an interrupted conversion leaves
    nothing); skipped when model_dir holds it already. `validation` has read and checked the checkpoint."""
    if (model_dir / convert.META_FILE).exists():
        logging.info("The teacher is already converted (%s); skipping its conversion.", model_dir)
        return model_dir
    if jax.process_index() == 0:
        meta = convert.import_checkpoint(config.teacher.arch, config.teacher.checkpoint, model_dir,
                                         config.teacher.width)
        logging.info("Converted the teacher %s (%s) into %s, sha256 %s.", config.teacher.checkpoint,
                     config.teacher.arch, model_dir, meta["sha256"][:12])
    parallel.sync("kdep_jax.pipeline.convert_teacher")  # every process reads it next
    return model_dir


def train_teacher(config, teacher_workdir: epath.Path, mesh) -> epath.Path:
    """The demo's teacher: nothing can be downloaded here, so it is trained on the upstream split first."""
    model_dir = teacher_workdir / "model"
    if (model_dir / convert.META_FILE).exists():
        logging.info("The teacher is already trained (%s); skipping its training.", model_dir)
        return model_dir
    result = supervised.train(config.teacher.train, teacher_workdir, mesh, field_prefix="teacher.train.")
    if result.preempted:
        raise Preempted
    if jax.process_index() == 0:
        variables = parallel.to_host({"params": result.state.params, "batch_stats": result.state.batch_stats})
        convert.save_converted(model_dir, variables, config.teacher.arch, source=f"trained in {teacher_workdir}")
    parallel.sync("kdep_jax.pipeline.train_teacher")  # every process reads it next
    return model_dir


def export_student(config, workdir: epath.Path, variables=None) -> dict:
    """Writes whichever of the student's forms is missing, on process 0: `student/` (the converted form, for
    transfer here) from `variables`, then `student.safetensors` and `student.pth` (torchvision key names, for
    PyTorch) from `student/`. Returns the paths that exist."""
    student_dir = workdir / convert.STUDENT_SUBDIR
    files = {"student_safetensors": workdir / "student.safetensors", "student_pth": workdir / "student.pth"}
    if jax.process_index() == 0:
        if variables is not None:
            convert.save_converted(student_dir, variables, config.student.arch, source=f"KDEP run in {workdir}")
            faults.point("export.converted")
        missing = [path for path in files.values() if not path.exists()]
        try:
            state_dict = convert.to_torchvision(convert.load_converted(student_dir, config.student.arch)[0],
                                                config.student.arch) if missing else {}
        except convert.ConversionError as error:  # a user's own architecture, or a resized one: no torch layout
            logging.warning("The student has no PyTorch state_dict (%s); its Flax form is in %s.", error, student_dir)
            missing = []
        for path in missing:
            try:
                convert.write_state_dict(state_dict, path)
            except convert.ConversionError as error:  # torch is not installed: the safetensors file is there
                logging.warning("Skipped %s: %s", path.name, error)
    parallel.sync("kdep_jax.pipeline.export_student")  # every process reads student/ next
    return {"student": str(student_dir), **{name: str(path) for name, path in files.items() if path.exists()}}


def transfer(config, workdir: epath.Path, mesh, field_prefix: str = "") -> list[dict]:
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
    result = supervised.train(config, workdir, mesh, backbone=backbone, field_prefix=field_prefix)
    if result.preempted:
        raise Preempted
    row = {**run, "top1": result.last_eval["eval_top1"], "top5": result.last_eval["eval_top5"]}
    _write_results(results_path, [row])
    return [row]


def _check_same_run(path: epath.Path, rows, run: dict) -> None:
    """A results.json left by another run (another init, student, dataset, seed...) is refused, not returned."""
    stored = rows[0] if isinstance(rows, list) and len(rows) == 1 and isinstance(rows[0], dict) else {}
    differences = [f"{key}: {stored.get(key)!r} there, {value!r} here" for key, value in run.items()
                   if stored.get(key) != value]
    if differences:
        raise ConfigError(f"{path} holds the result of another run ({'; '.join(differences)}). Delete it (and the "
                          f"checkpoints/ next to it) to run this transfer there, or use another --workdir.")


def _with_init(config, init: str, label: str | None = None):
    """The downstream config of one init; its loop is named after it in logs ("downstream_kdep"; in a comparison,
    after the method, "downstream_ssld")."""
    config = config.copy_and_resolve_references()
    config.init = init
    config.name = f"{config.name}_{label or init.partition(':')[0]}"
    return config


def _write_results(path: epath.Path, rows: list[dict]) -> None:
    if jax.process_index() == 0:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(path)
