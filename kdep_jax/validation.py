"""Checks a run's config against the devices and its inputs before anything is written to the workdir.

Whatever would make a stage fail later (a path that does not exist, a batch that does not split over the
devices, an unknown name, a teacher checkpoint of another architecture, a stage the workdir's filesystem
cannot hold) fails here, as one `ConfigError` naming the field and the fix, so that the corrected command
simply runs: nothing in the workdir records the failed attempt.
"""
from __future__ import annotations

import json
import logging

import jax
from etils import epath

from kdep_jax import config_lib, convert, data, methods, models, xla_flags
from kdep_jax.errors import ConfigError

DTYPES = ("float32", "bfloat16")
MODES = ("kdep", "transfer", "compare")


def validate(config, num_devices: int, num_processes: int, workdir) -> None:
    """Raises ConfigError for the first setting of `config` that cannot run on this mesh and these inputs.

    Names and numbers first, then paths, then the data (opening a dataset is the slowest check).
    """
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r} is not a mode; use one of {', '.join(MODES)}.")
    check_allow_changes(config)
    if config.mode == "compare":
        _check_compare(config, num_devices, num_processes, workdir)
        return
    if config.mode == "transfer":
        _check_supervised(config, "", num_devices, num_processes)
        _check_init(config, "")
        _check_supervised_data(config, "")
        return
    method = _check_kdep_settings(config, num_devices, num_processes, workdir)
    dims = models.dim_from_config(config.teacher), models.dim_from_config(config.student)
    teacher = config.teacher.train
    if teacher is None:  # a converted teacher, or a checkpoint the run converts: read before any data
        teacher_classes = _pretrained_teacher_classes(config)
        method.check(*dims, teacher_classes)
    info = _check_kdep_data(config, method)
    if teacher is not None:  # the teacher trained here classifies its training data's classes
        teacher_classes = data.dataset_info(teacher.data, teacher.data.split).num_classes
        method.check(*dims, teacher_classes)
    if method.needs_labels and method.student_logits and info.num_classes != teacher_classes:
        raise ConfigError(
            f"config.method={config.method!r} trains the student's classifier, as wide as the teacher's "
            f"{teacher_classes} classes, on the data's labels, but config.data ({config.data.name} split "
            f"{config.data.split!r}) has {info.num_classes} classes. Distil on data labelled with the teacher's "
            f"classes, or {method.label_free_fix}.")


def _check_kdep_settings(config, num_devices: int, num_processes: int, workdir):
    """The names and numbers of a KDEP-mode run (no file or dataset is opened); returns its method."""
    _check_loop(config, "", num_devices, num_processes)
    _check_arch(config.teacher, "teacher")
    if config.teacher.forward_chunk is not None and config.teacher.forward_chunk < 0:
        raise ConfigError(f"config.teacher.forward_chunk={config.teacher.forward_chunk} is negative; set the most "
                          f"images per device in each chunk of the teacher's forward pass (e.g. 4), 0 for the whole "
                          f"batch at once, or leave it unset for the default measured for the teacher and the device.")
    if config.teacher.dtype is not None and config.teacher.dtype not in DTYPES:
        raise ConfigError(f"config.teacher.dtype={config.teacher.dtype!r}: use one of {', '.join(DTYPES)}, or leave "
                          f"it unset for config.dtype ({config.dtype!r}).")
    if config.teacher.dtype == "bfloat16" and jax.default_backend() == "cpu" and not xla_flags.amx_bf16():
        logging.warning("config.teacher.dtype='bfloat16' on a CPU without AMX tiles: XLA:CPU computes bfloat16 "
                        "convolutions more slowly than float32 ones (benchmarks/README.md); float32 is faster here.")
    if ((config.teacher.dtype or config.dtype) == "bfloat16" and jax.default_backend() == "cpu"
            and xla_flags.amx_bf16() and not config.teacher.arch.startswith("resnet")):
        logging.warning("A %s teacher in bfloat16 on a CPU: kdep_jax's AMX kernels compute a ResNet's convs, and this "
                        "teacher's layers stay XLA's, which computes bfloat16 dot products and depthwise convs more "
                        "slowly than float32 ones (benchmarks/README.md); --config.teacher.dtype=float32 is faster "
                        "here.", config.teacher.arch)
    _check_arch(config.student, "student")
    _check_batch(config.alignment.batch_size, "alignment.batch_size", num_devices, num_processes)
    method = methods.create(config)
    if config.target_cache.enabled and not (method.cacheable or method.per_example_targets):
        raise ConfigError(f"config.method={config.method!r} cannot use the target cache (its targets change from one "
                          f"step to the next): set --config.target_cache.enabled=False.")
    _check_teacher_source(config)
    teacher = config.teacher.train
    if teacher is not None:
        if _network(teacher.model) != _network(config.teacher):
            raise ConfigError(
                f"config.teacher.train.model is {_network(teacher.model)} but the teacher is "
                f"{_network(config.teacher)}: set both to the same architecture, width and overrides.")
        _check_supervised(teacher, "teacher.train.", num_devices, num_processes)
    if config.downstream is not None:
        _check_supervised(config.downstream, "downstream.", num_devices, num_processes)
        if _network(config.downstream.model) != _network(config.student):
            raise ConfigError(f"config.downstream.model is {_network(config.downstream.model)} but the student is "
                              f"{_network(config.student)}: it fine-tunes the student, so set the same architecture, "
                              f"width and overrides.")
    cache_dir = str(config.target_cache.path or epath.Path(workdir) / "target_cache")
    if config.target_cache.enabled and "://" in cache_dir:
        raise ConfigError(
            f"The teacher-target cache is memory-mapped, so it needs a local disk, not {cache_dir}: set "
            f"--config.target_cache.path to a local directory (the workdir itself may stay on the bucket).")
    return method


def _check_kdep_data(config, method):
    """The datasets of a KDEP-mode run (distillation, statistics, the supervised stages) open and suit the
    method; returns the distillation data's info."""
    info = _check_train_data(config, "")
    stats_data = config.alignment.data if config.alignment.data is not None else config.data
    _check_split(stats_data, stats_data.split, "alignment.data" if config.alignment.data is not None else "data")
    if method.per_example_targets and not info.random_access:
        raise ConfigError(
            f"config.method={config.method!r} looks its targets up by example, which needs random access to the data, "
            f"but TFDS {config.data.name!r} is stored as TFRecord. Convert it once (tfds convert_format ... "
            f"--out_file_format=array_record).")
    if method.needs_labels and info.num_classes == 0:
        raise ConfigError(
            f"config.method={config.method!r} uses labels, but config.data ({config.data.name} split "
            f"{config.data.split!r}) is a folder of unlabeled images. Use labelled data (<split>/<class>/*.jpg) or "
            f"{method.label_free_fix}.")
    if config.target_cache.enabled and not info.random_access:
        raise ConfigError(
            f"config.target_cache.enabled=True needs random access to the data, but TFDS {config.data.name!r} is "
            f"stored as TFRecord. Convert it once (tfds convert_format ... --out_file_format=array_record) or set "
            f"--config.target_cache.enabled=False.")
    for prefix, supervised_config in (("teacher.train.", config.teacher.train), ("downstream.", config.downstream)):
        if supervised_config is not None:
            _check_supervised_data(supervised_config, prefix)
    return info


def _check_teacher_source(config) -> None:
    """One of teacher.path, teacher.checkpoint and teacher.train says where the teacher comes from."""
    given = [name for name, value in (("path", config.teacher.path), ("checkpoint", config.teacher.checkpoint),
                                      ("train", config.teacher.train is not None)) if value]
    if len(given) > 1:
        raise ConfigError(
            f"config.teacher.{given[0]} and config.teacher.{given[1]} are both set; set one of them: path (a directory "
            f"written by `python -m kdep_jax.convert import`), checkpoint (a .pth/.safetensors file, or "
            f"pip:PACKAGE, that the run converts) or train (a teacher trained first).")


def _pretrained_teacher_classes(config) -> int | None:
    """The teacher of config.teacher.path or config.teacher.checkpoint exists and is of the teacher's architecture;
    returns its number of classes (None without a head). A checkpoint is read and converted in memory, so that
    one of another architecture is named here, before the run converts it into the workdir."""
    arch = config.teacher.arch
    if not config.teacher.checkpoint:
        check_converted(config.teacher.path, arch, "config.teacher.path", fix=(
            f"Set config.teacher.checkpoint to the teacher's torchvision .pth (the run converts it), or convert it "
            f"first: python -m kdep_jax.convert import --arch {arch} --input TEACHER.pth --output "
            f"{config.teacher.path or 'teachers/' + arch}"))
        return json.loads((epath.Path(config.teacher.path) / convert.META_FILE).read_text())["num_classes"]
    field = f"config.teacher.checkpoint={config.teacher.checkpoint!r}"
    if config.teacher.overrides.to_dict():
        raise ConfigError(f"{field} is converted into the architecture as torchvision builds it, but "
                          f"config.teacher.overrides is {config.teacher.overrides.to_dict()}: leave it empty.")
    try:
        variables = convert.read_checkpoint(arch, config.teacher.checkpoint, config.teacher.width,
                                            arch_fix="set config.teacher.arch to {}")
    except convert.ConversionError as error:
        raise ConfigError(f"{field}: {error}") from None
    return convert.head_classes(variables, arch)


def _check_compare(config, num_devices: int, num_processes: int, workdir) -> None:
    """A comparison: its methods and seeds, and each method's run as a KDEP-mode config would be checked."""
    names = [name.strip() for name in config.compare.methods.split(",") if name.strip()]
    if not names:
        raise ConfigError("config.compare.methods is empty: name the methods to compare, comma-separated "
                          f"(known: {', '.join(methods.METHODS)}).")
    try:
        seeds = [int(seed) for seed in config.compare.seeds.split(",") if seed.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"config.compare.seeds={config.compare.seeds!r}: give the downstream seeds as "
                          f"comma-separated integers, e.g. '0,1'.")
    if config.downstream is None:
        raise ConfigError("config.mode='compare' fine-tunes every student downstream: config.downstream must be set.")
    for name in names:
        per_method = config.copy_and_resolve_references()
        per_method.mode, per_method.method = "kdep", name
        validate(per_method, num_devices, num_processes, workdir)


def check_allow_changes(config) -> None:
    """Every name in config.allow_changes must be a field of the config."""
    flat = config_lib.flatten(json.loads(config.to_json_best_effort()))
    for name in filter(None, (part.strip() for part in config.allow_changes.split(","))):
        if name not in flat:
            raise ConfigError(f"config.allow_changes names {name!r}, which is not a config field (fields look like "
                              f"'train.lr' or 'downstream.train.lr').")


def check_converted(path, arch: str, field: str, fix: str) -> None:
    """A directory written by `kdep_jax.convert` (or a run's student), holding this arch."""
    if not path:
        raise ConfigError(f"{field} is not set. {fix}")
    meta_path = epath.Path(path) / convert.META_FILE
    if not meta_path.exists():
        raise ConfigError(f"{field}: no converted checkpoint at {path} ({meta_path} does not exist). {fix}")
    made_for = json.loads(meta_path.read_text()).get("arch")
    if made_for != arch:
        raise ConfigError(f"{field}: {path} holds a {made_for} checkpoint, but the config says {arch}. Point it at a "
                          f"{arch} checkpoint, or set the arch to {made_for}.")


def _check_supervised(config, prefix: str, num_devices: int, num_processes: int) -> None:
    _check_loop(config, prefix, num_devices, num_processes)
    _check_arch(config.model, f"{prefix}model")
    _check_batch(config.eval_batch_size, f"{prefix}eval_batch_size", num_devices, num_processes)
    if config.eval_every_epochs < 1:
        raise ConfigError(f"config.{prefix}eval_every_epochs={config.eval_every_epochs}: evaluate every 1 or more "
                          f"epochs.")


def _check_supervised_data(config, prefix: str) -> None:
    info = _check_train_data(config, prefix)
    if info.num_classes == 0:
        raise ConfigError(f"config.{prefix}data ({config.data.name} split {config.data.split!r}) is a folder of "
                          f"unlabeled images, but supervised training needs labels: <split>/<class>/*.jpg.")
    _check_split(config.data, config.data.eval_split, f"{prefix}data", split_field="eval_split")


def _check_init(config, prefix: str) -> None:
    """config.init of a transfer run: its backbone exists and is of the model's architecture."""
    kind, _, location = config.init.partition(":")
    field = f"config.{prefix}init"
    if kind == "scratch" and not location:
        return
    if kind == "kdep" and location:
        directory = epath.Path(location)
        if not (directory / convert.META_FILE).exists() and (directory / convert.STUDENT_SUBDIR).exists():
            directory = directory / convert.STUDENT_SUBDIR
        check_converted(directory, config.model.arch, f"{field}={config.init!r}",
                        fix="Point it at the workdir of a finished KDEP run or at a directory written by "
                            "`python -m kdep_jax.convert import`.")
        return
    if kind == "torchvision" and location:
        if not epath.Path(location).is_file():
            raise ConfigError(f"{field}={config.init!r}: {location} is not a file; point it at a torchvision "
                              f"{config.model.arch} .pth or .safetensors checkpoint.")
        return
    raise ConfigError(f"{field}={config.init!r} is not understood; use 'scratch', 'kdep:WORKDIR' or "
                      f"'torchvision:FILE'.")


def _check_loop(config, prefix: str, num_devices: int, num_processes: int) -> None:
    """The SGD recipe and loop settings shared by every trainer."""
    field = f"config.{prefix}"
    if config.dtype not in DTYPES:
        raise ConfigError(f"{field}dtype={config.dtype!r}: use one of {', '.join(DTYPES)}.")
    if config.dtype == "bfloat16" and jax.default_backend() == "cpu" and not xla_flags.amx_bf16():
        logging.warning("%sdtype='bfloat16' on a CPU without AMX tiles: XLA:CPU computes bfloat16 convolutions and "
                        "dot products more slowly than float32 ones (benchmarks/README.md); float32 is faster here. "
                        "bfloat16 is for GPUs, TPUs and Intel Xeons with AMX, where kdep_jax computes CNNs' dense "
                        "convs on the AMX tiles.", field)
    train = config.train
    for name in ("num_epochs", "lr_decay_every_epochs"):
        if train[name] < 1:
            raise ConfigError(f"{field}train.{name}={train[name]}: it must be a positive number of epochs "
                              f"(a schedule without decay: set lr_decay_every_epochs to num_epochs).")
    if not train.lr > 0:
        raise ConfigError(f"{field}train.lr={train.lr}: the learning rate must be positive.")
    for name, known in (("schedule", ("step", "cosine")), ("optimizer", ("sgd", "adamw"))):
        if train[name] not in known:
            raise ConfigError(f"{field}train.{name}={train[name]!r}: use one of {', '.join(known)}.")
    if not 0 <= train.warmup_epochs < train.num_epochs:
        raise ConfigError(f"{field}train.warmup_epochs={train.warmup_epochs}: it must be at least 0 and less than "
                          f"train.num_epochs={train.num_epochs}.")
    for name in ("log_every_steps", "steps_per_call", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] < 1:
            raise ConfigError(f"{field}{name}={config[name]}: it must be 1 or more.")
    _check_batch(train.batch_size, f"{prefix}train.batch_size", num_devices, num_processes)


def _check_train_data(config, prefix: str):
    """The training split opens and holds at least one batch; returns its DatasetInfo."""
    info = _check_split(config.data, config.data.split, f"{prefix}data")
    if info.num_examples < config.train.batch_size:
        raise ConfigError(
            f"{config.data.name} split {config.data.split!r} has {info.num_examples} examples, fewer than one batch "
            f"of config.{prefix}train.batch_size={config.train.batch_size}: lower the batch size or use more data.")
    return info


def _check_batch(batch_size: int, field: str, num_devices: int, num_processes: int) -> None:
    if batch_size < 1 or batch_size % num_devices or batch_size % num_processes:
        multiple = max(num_devices, num_processes)
        raise ConfigError(f"config.{field}={batch_size} does not split evenly over the {num_devices} devices of "
                          f"{num_processes} process(es): choose a multiple of {multiple}.")


def _check_split(data_config, split: str, field: str, split_field: str = "split"):
    """Opens the split (data.DataError names the dataset and the fix); returns its DatasetInfo."""
    try:
        return data.dataset_info(data_config, split)
    except data.DataError as error:
        raise ConfigError(f"config.{field} ({split_field} {split!r}): {error}") from None


def _network(section) -> tuple:
    return section.arch, section.width, section.overrides.to_dict()


def _check_arch(section, field: str) -> None:
    """The arch exists (or imports), takes the width and overrides, and (a user's own) returns what methods read."""
    try:
        models.check_arch(section.arch)
        network = models.from_config(section, num_classes=None)
        if models.is_custom(section.arch):
            models.check_outputs(network)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.{field}.arch={section.arch!r} (width {section.width}, overrides "
                          f"{section.overrides.to_dict()}): {error}") from None
