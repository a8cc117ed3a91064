"""FKD-style teacher-target cache: record the teacher's targets once, replay them in every later run.

The teacher and the alignment are frozen, so the target of one image under one augmentation draw never
changes. A build pass runs the teacher over the whole distillation schedule and records, for every step
and every row, the example's index, its crop box and flip, and the k-d target (float16); distillation then
rebuilds exactly those batches from the deterministic input pipeline (each batch is a function of the seed
and the step), checks that the examples and crops are the recorded ones, and reads the targets instead of
running the teacher.

Each process records and reads only its own rows, so the cache is sharded across hosts as the batches are:
`crops_p{P}.npy` (steps, L, 6) int32 and `targets_p{P}.npy` (steps, L, k) float16 per process P, and
`meta.json`, written last, with what the targets depend on. The files are memory-mapped: the cache may be
larger than RAM (about k * 2 + 24 bytes per image per epoch; 12 GB for the paper's 10%-ImageNet run), and
must be on a local filesystem (a `gs://` workdir needs `config.target_cache.path` on a local disk).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec
from tqdm.auto import tqdm

from kdep_jax import data, faults, parallel
from kdep_jax.errors import UserError

ROW_FIELDS = ("index", "top", "left", "height", "width", "flip")  # what is recorded of each row


@dataclasses.dataclass(frozen=True)
class TargetCache:
    crops: np.ndarray  # (steps, L, 6) int32, this process's rows: ROW_FIELDS
    targets: np.ndarray  # (steps, L, k) float16


def bytes_per_image_epoch(dim: int) -> int:
    return dim * np.dtype(np.float16).itemsize + len(ROW_FIELDS) * np.dtype(np.int32).itemsize


def cache_dir(config, workdir) -> epath.Path:
    return epath.Path(config.target_cache.path or epath.Path(workdir) / "target_cache")


def provenance(config, teacher_and_method: dict, dim: int, num_steps: int) -> dict:
    """Everything the recorded crops and targets depend on; a cache made for anything else is rebuilt.

    teacher_and_method: the teacher, its data and the method's settings (`teacher.data_provenance`,
    `Method.provenance`).
    """
    return {**teacher_and_method, "dim": dim, "num_steps": num_steps, "batch_size": config.train.batch_size,
            "process_count": jax.process_count(), "train_seed": config.seed}


def _paths(directory: epath.Path):
    p = jax.process_index()
    return directory / f"crops_p{p}.npy", directory / f"targets_p{p}.npy"


def load(directory, wanted: dict) -> TargetCache | None:
    """The cache in `directory` if it is complete and was made for `wanted`, else None."""
    directory = epath.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    made_for = json.loads(meta_path.read_text())
    if made_for != json.loads(json.dumps(wanted)):
        differences = sorted(k for k in set(made_for) | set(wanted) if made_for.get(k) != wanted.get(k))
        logging.warning("The target cache in %s was made for another run (%s differ); rebuilding it.", directory,
                        ", ".join(differences))
        return None
    crops_path, targets_path = _paths(directory)
    return TargetCache(np.load(crops_path, mmap_mode="r"), np.load(targets_path, mmap_mode="r"))


def build(config, directory, mesh, targets_of, teacher_variables, constants, wanted: dict) -> TargetCache:
    """One pass of the teacher over the whole schedule; this process's rows go to its own files.

    `targets_of(teacher_variables, constants, images)` is the online step's target function.
    """
    directory = epath.Path(directory)
    (directory / "meta.json").unlink(missing_ok=True)  # an incomplete cache is never read
    directory.mkdir(parents=True, exist_ok=True)
    num_steps, dim = wanted["num_steps"], wanted["dim"]
    local = parallel.local_batch_size(config.train.batch_size)
    float16_targets = jax.jit(lambda variables, compact, images: targets_of(variables, compact, images).astype(
        jnp.float16))
    variables, compact = parallel.replicate((teacher_variables, constants), mesh)
    crops_path, targets_path = _paths(directory)
    partial = [epath.Path(f"{path}.partial") for path in (crops_path, targets_path)]
    crops = np.lib.format.open_memmap(partial[0], "w+", np.int32, (num_steps, local, len(ROW_FIELDS)))
    targets = np.lib.format.open_memmap(partial[1], "w+", np.float16, (num_steps, local, dim))
    batches = data.train_batches(config.data, config.data.split, config.train.batch_size, seed=config.seed,
                                 with_crops=True)
    for step in tqdm(range(num_steps), desc="target cache", unit="step", disable=jax.process_index() != 0,
                     dynamic_ncols=True):
        batch = next(batches)
        images = parallel.shard_batch({"image": batch["image"]}, mesh)["image"]
        rows = multihost_utils.global_array_to_host_local_array(float16_targets(variables, compact, images), mesh,
                                                                 PartitionSpec("data"))
        crops[step], targets[step] = _row_record(batch), np.asarray(rows)
        faults.point("target_cache.step")
    for array, path, final in ((crops, partial[0], crops_path), (targets, partial[1], targets_path)):
        array.flush()
        os.replace(path, final)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("kdep_jax.target_cache.build")
    if jax.process_index() == 0:
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(wanted, indent=1))
        tmp.replace(directory / "meta.json")
    logging.info("Target cache: %d steps x %d rows x %d-d float16 in %s (%d bytes per image per epoch).", num_steps,
                 local, dim, directory, bytes_per_image_epoch(dim))
    return TargetCache(np.load(crops_path, mmap_mode="r"), np.load(targets_path, mmap_mode="r"))


def _row_record(batch: dict) -> np.ndarray:
    """(L, 6) int32: each row's example index, crop box and flip."""
    return np.concatenate([np.asarray(batch["index"], np.int32)[:, None], np.asarray(batch["crop"], np.int32)], 1)


def replay(batches, cache: TargetCache, start_step: int):
    """The pipeline's batches from `start_step` on with their recorded targets, after checking that each row is
    the recorded example under the recorded crop and flip."""
    for step, batch in enumerate(batches, start=start_step):
        recorded, rebuilt = cache.crops[step], _row_record(batch)
        if not np.array_equal(rebuilt, recorded):
            row = int(np.argmax(np.any(rebuilt != recorded, axis=1)))
            raise UserError(
                f"Step {step}, row {row}: the input pipeline gives example {rebuilt[row, 0]} with crop and flip "
                f"{rebuilt[row, 1:].tolist()}, the target cache recorded example {recorded[row, 0]} with "
                f"{recorded[row, 1:].tolist()}, so its targets belong to other images (the data or the pipeline "
                f"changed since it was built). Delete the cache directory and rerun to rebuild it.")
        del batch["crop"], batch["index"]
        yield {**batch, "targets": np.asarray(cache.targets[step])}
