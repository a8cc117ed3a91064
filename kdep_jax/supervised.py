"""Supervised training with cross-entropy: the demo's teacher, and fine-tuning or linear probing downstream.

One trainer for both, on the shared loop of `kdep_jax.trainer`: a backbone (pre-trained or not) gets a
new classifier head for the dataset's classes and is trained with the paper's SGD recipe.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from kdep_jax import convert, data, losses, models, parallel, trainer


def create_model(config, num_classes):
    return models.from_config(config.model, num_classes=num_classes, dtype=jnp.dtype(config.dtype))


def load_backbone(init: str, arch: str, width: float = 1.0):
    """Backbone variables for `init`: 'scratch' (None), 'kdep:WORKDIR' or 'torchvision:FILE'.

    A missing file or one of another architecture fails here, naming config.init, before any training.
    """
    kind, _, location = init.partition(":")
    if kind == "scratch" and not location:
        return None, "scratch"
    try:
        if kind == "kdep" and location:
            variables, meta = convert.load_converted(convert.find_converted(location), arch)
            return variables, f"kdep:{meta['sha256'][:12]}"
        if kind == "torchvision" and location:
            variables = convert.from_torchvision(convert.read_state_dict(location), arch, width)
            return variables, f"torchvision:{epath.Path(location).name}"
    except convert.ConversionError as error:
        raise convert.ConversionError(
            f"config.init={init!r}: {str(error).rstrip('.')}. Point it at the workdir of a finished KDEP run or a "
            f"directory written by `python -m kdep_jax.convert import` (kdep:DIR), or at a torchvision {arch} "
            f"checkpoint (torchvision:FILE), matching config.model.arch={arch!r} and width {width}.") from None
    raise ValueError(f"config.init={init!r} is not understood; use 'scratch', 'kdep:WORKDIR' or 'torchvision:FILE'.")


def backbone_shapes(config):
    """The variables of the model without its head: whatever the full model has beyond them is the head,
    so no layer names are assumed here."""
    size = config.data.image_size
    return jax.eval_shape(functools.partial(create_model(config, None).init, train=False), jax.random.key(0),
                          jnp.zeros((1, size, size, 3), jnp.float32))


def attach_backbone(variables, backbone, expected_shapes):
    """The new model's variables with every backbone entry taken from `backbone`; the head stays new."""
    merged = {}
    for collection, new_tree in variables.items():
        expected = expected_shapes.get(collection, {})
        source = backbone.get(collection, {})
        merged[collection] = {}
        for name, new_value in new_tree.items():
            if name not in expected:
                merged[collection][name] = new_value  # the new head
                continue
            if name not in source:
                raise convert.ConversionError(f"The pre-trained backbone has no '{collection}/{name}'; was it made "
                                              f"for another architecture?")
            _check_shapes(f"{collection}/{name}", source[name], new_value)
            merged[collection][name] = source[name]
    return merged


def _check_shapes(path, source, target):
    for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(source), jax.tree.leaves(target)):
        if np.shape(a) != np.shape(b):
            raise convert.ConversionError(f"The pre-trained backbone's {path}{jax.tree_util.keystr(key)} has shape "
                                          f"{np.shape(a)}, the model expects {np.shape(b)}: another architecture or "
                                          f"width?")


def make_loss_fn(model, linear_probe: bool):
    def loss_fn(params, batch_stats, batch, constants, rng):
        variables = {"params": params, "batch_stats": batch_stats}
        if linear_probe:  # frozen features: BatchNorm (and dropout) stay in eval mode
            logits, _ = model.apply(variables, batch["image"], train=False)
            new_batch_stats = batch_stats
        else:  # the model's dropout, where it has one (MobileNetV2's classifier, p=0.2 as in torchvision)
            (logits, _), updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                                               rngs={"dropout": rng})
            new_batch_stats = updates.get("batch_stats", {})
        loss = losses.cross_entropy_loss(logits, batch["label"])
        top1 = jnp.mean(losses.top_k_correct(logits, batch["label"], 1))
        return loss, (new_batch_stats, {"train_top1": top1})

    return loss_fn


def make_evaluator(model, data_config, split: str, global_batch_size: int, mesh):
    """Top-1/top-5 over the whole split, each example counted once across devices and processes."""

    @functools.partial(jax.jit, in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
                       out_shardings=parallel.replicated_sharding(mesh))
    def eval_step(variables, batch):
        logits, _ = model.apply(variables, batch["image"], train=False)
        mask = batch["mask"].astype(jnp.float32)
        k5 = min(5, logits.shape[-1])
        return {"correct1": jnp.sum(losses.top_k_correct(logits, batch["label"], 1) * mask),
                "correct5": jnp.sum(losses.top_k_correct(logits, batch["label"], k5) * mask),
                "loss_sum": losses.cross_entropy_loss(logits, batch["label"], mask) * jnp.sum(mask),
                "count": jnp.sum(mask)}

    def evaluate(state: trainer.TrainState) -> dict:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        totals = None
        for batch in data.eval_batches(data_config, split, global_batch_size):
            sums = eval_step(variables, parallel.shard_batch(batch, mesh))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = float(totals["count"])
        return {"eval_top1": 100.0 * float(totals["correct1"]) / count,
                "eval_top5": 100.0 * float(totals["correct5"]) / count,
                "eval_loss": float(totals["loss_sum"]) / count, "eval_count": int(count)}

    return evaluate


def train(config, workdir, mesh, backbone=None, field_prefix: str = "") -> trainer.FitResult:
    """Trains `config.model` on `config.data` (see configs/transfer/) in `workdir`.

    field_prefix: where `config` sits in the run's config ("teacher.train."), so that messages name fields
    the user can set.
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = data.dataset_info(config.data, config.data.split)
    model = create_model(config, info.num_classes)
    variables = trainer.init_variables(model, config.data.image_size, config.seed)
    expected_backbone = backbone_shapes(config)
    if backbone is not None:
        variables = attach_backbone(variables, backbone, expected_backbone)
    steps_per_epoch, schedule, tx = trainer.recipe(config, info.num_examples)
    if config.linear_probe:
        labels = {name: ("frozen" if name in expected_backbone["params"] else "head") for name in variables["params"]}
        tx = optax.multi_transform({"head": tx, "frozen": optax.set_to_zero()}, labels)
    state = trainer.create_train_state(variables, tx, mesh, config.seed)
    settings = trainer.loop_settings(config, config.name, steps_per_epoch, steps_per_epoch * config.eval_every_epochs,
                                     field_prefix)
    evaluate = make_evaluator(model, config.data, config.data.eval_split, config.eval_batch_size, mesh)
    logging.info("%s: %s (%d parameters) on %s/%s, %d examples, %d classes, %d steps.", settings.name,
                 config.model.arch, trainer.count_params(variables["params"]), config.data.name, config.data.split,
                 info.num_examples, info.num_classes, settings.num_steps)
    return trainer.fit(
        workdir=workdir, settings=settings, state=state,
        train_step=trainer.make_train_step(make_loss_fn(model, config.linear_probe), tx, mesh, settings.steps_per_call),
        constants=(),
        batches=lambda start: data.train_batches(config.data, config.data.split, config.train.batch_size,
                                                 seed=config.seed, start_step=start),
        mesh=mesh, lr_schedule=schedule, evaluate=evaluate)
