"""The frozen teacher: loading it, what it outputs, and one pass of it over a dataset.

The teacher is never trained and never checkpointed with the student: it is read from its converted
directory each run, and its content hash ties whatever is computed from it (alignment statistics, a
target cache) to it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from etils import epath
from tqdm.auto import tqdm

from kdep_jax import convert, data, faults, models, parallel, xla_flags
from kdep_jax.models import convnext, efficientnet, layers, swin, vit

# The teachers whose forward pass is faster in chunks on a CPU with AMX tiles, and the chunk's pixels. On an Intel Xeon
# (family 6 model 167, 2 cores, float32, 224 px) 4 images at a time against a batch of 32 at once made the forward pass
# of Swin-T 1.37x faster, ConvNeXt-T 1.27x, EfficientNet-Lite0 1.29x, and the Swin-T -> ResNet-18 step 1.19-1.22x; a
# ResNet-50's forward pass was 0.79x. ViT-B/16's was 1.12x too, until its Linear layers ran as kdep_jax's kernel there
# (`layers.with_packed_dense_kernels`), which reads each weight once per pass: its step is 1.06x faster on the whole
# batch than in chunks. The demo's small Swin at 32 px was 0.62-0.65x in chunks of 4, so a chunk holds as many pixels as
# 4 images of 224 px (196 images of 32 px: their whole batch). ResNets and MobileNetV2, other CPUs and accelerators run
# the whole batch at once until measured (benchmarks/README.md).
CHUNKED_ON_AMX_CPUS = frozenset({*swin.CONFIGS, *convnext.CONFIGS, *efficientnet.ARCHS})
AMX_CPU_CHUNK_PIXELS = 4 * 224 * 224


@dataclasses.dataclass(frozen=True)
class Teacher:
    variables: dict  # {"params", "batch_stats"}
    sha256: str  # of the converted file: what statistics and caches record
    num_classes: int | None  # its classifier's width; None when it was converted without one


def directory(config, workdir) -> epath.Path:
    """Where a run reads its converted teacher: config.teacher.path, or WORKDIR/teacher/model, where the run
    converts config.teacher.checkpoint or saves the teacher it trains (config.teacher.train)."""
    return epath.Path(config.teacher.path) if config.teacher.path else epath.Path(workdir) / "teacher" / "model"


def load(config, directory) -> Teacher:
    """The converted teacher (`validation.validate` has checked that it exists and is of this arch)."""
    variables, meta = convert.load_converted(directory, config.teacher.arch)
    return Teacher({"params": variables["params"], "batch_stats": variables["batch_stats"]}, meta["sha256"],
                   meta.get("num_classes"))


def dtype(config) -> str:
    """The teacher's computation dtype: config.teacher.dtype, else the run's config.dtype."""
    return config.teacher.dtype or config.dtype


def model(config, num_classes: int | None = None):
    return models.from_config(config.teacher, num_classes=num_classes, dtype=jnp.dtype(dtype(config)))


def forward_chunk(config, image_pixels: int, backend: str | None = None, cpuinfo: str | None = None) -> int:
    """At most how many images (of `image_pixels` pixels each) per device each chunk of the teacher's forward pass
    takes, 0 for the whole batch: config.teacher.forward_chunk, or when unset the measured default for the teacher's
    arch on `backend` (JAX's default) and the CPU `cpuinfo` describes (this machine's /proc/cpuinfo when None)."""
    if config.teacher.forward_chunk is not None:
        return config.teacher.forward_chunk
    on_amx_cpu = (backend or jax.default_backend()) == "cpu" and "amx_tile" in xla_flags.cpu_features(cpuinfo)
    if not (on_amx_cpu and config.teacher.arch in CHUNKED_ON_AMX_CPUS):
        return 0
    return max(1, AMX_CPU_CHUNK_PIXELS // image_pixels)


def outputs_fn(config, names: tuple[str, ...], num_classes: int | None = None):
    """(variables, images) -> {name: float32 array} of the teacher in eval mode: "logits" and any of its features
    ("pre_relu", "pooled", "stage1".."stage4"). The images come ImageNet-normalised from the pipeline; a teacher
    whose weights expect another normalisation (EfficientNet-Lite's) gets its own. The batch goes through in chunks of
    `forward_chunk` images per device."""
    network = model(config, num_classes if "logits" in names else None)
    preprocessing = getattr(network, "preprocessing", models.preprocessing.IMAGENET)

    def forward(variables, images):
        images = models.preprocessing.to_own_normalisation(images, preprocessing)
        logits, features = network.apply(variables, images, train=False)
        available = {"logits": logits, **features}
        return {name: available[name].astype(jnp.float32) for name in names}

    def outputs(variables, images):
        chunk = forward_chunk(config, images.shape[1] * images.shape[2])
        if config.teacher.arch in vit.CONFIGS:  # measured for ViT's Linear layers only
            variables = layers.with_packed_dense_kernels(variables)
        return parallel.map_in_chunks(functools.partial(forward, variables), images, chunk)

    return outputs


def last_stage_fn(config):
    """(variables, map shaped as the teacher's stage 3) -> its final map, float32: the frozen teacher's layers after
    stage 3 (its module's `last_stage`, eval mode). Gradients flow through them into the map, never into the
    variables, which are constants of the step (ScaleKD's teacher parameter perception)."""
    network = model(config)
    return lambda variables, x: network.apply(variables, x, method="last_stage")


def data_provenance(config, teacher: Teacher, data_config) -> dict:
    """What a pass of the teacher over `data_config` depends on; a file whose provenance differs is not reused.

    Every data setting (which images, how they are cropped, which corrupt ones are left out), the seed of
    the augmentation and the teacher's compute dtype; only the reader's thread count is left out, it changes no
    value.
    """
    settings = data_config.to_dict()
    settings.pop("threads")
    provenance = {"teacher_sha256": teacher.sha256, "teacher_arch": config.teacher.arch,
                  "teacher_width": config.teacher.width, "data": settings, "seed": config.seed, "dtype": dtype(config)}
    if config.teacher.overrides:  # recorded only when set, so that files made before the field existed still match
        provenance["teacher_overrides"] = config.teacher.overrides.to_dict()
    return provenance


def feature_pass(config, mesh, teacher: Teacher, data_config, batch_size: int, output: str = "pre_relu",
                 augment: bool = True, description: str = "teacher pass"):
    """One pass of the teacher over `data_config`'s split: yields (features, mask, index) per global batch, the
    features sharded over the devices, the mask marking real rows, the index each row's example.

    augment: the training augmentation, each example's draw seeded by (config.seed + 1, example), as KDEP's
    statistics use it; otherwise the teacher's own eval transform (its resize and interpolation).
    """
    if not augment:
        own = getattr(model(config), "preprocessing", models.preprocessing.IMAGENET)
        data_config = data_config.copy_and_resolve_references()
        data_config.eval_resize_ratio, data_config.eval_interpolation = own.resize_ratio, own.interpolation
    features_of = jax.jit(lambda variables, images: outputs_fn(config, (output,))(variables, images)[output],
                          in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
                          out_shardings=parallel.batch_sharding(mesh))
    variables = parallel.replicate(teacher.variables, mesh)
    info = data.dataset_info(data_config, data_config.split)
    progress = tqdm(total=info.num_examples, desc=description, unit="img", unit_scale=True,
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    try:
        for batch in data.eval_batches(data_config, data_config.split, batch_size,
                                       augment_seed=config.seed + 1 if augment else None, with_index=True):
            index = batch.pop("index")
            batch = parallel.shard_batch(batch, mesh)
            yield features_of(variables, batch["image"]), batch["mask"], index
            progress.update(batch_size)
            faults.point("statistics.batch")
    finally:
        progress.close()
