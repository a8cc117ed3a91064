"""TCS: "All You Need in Knowledge Distillation Is a Tailored Coordinate System" (Zhou, Zhu, Wu; AAAI 2025).

What the paper states (abstract and introduction; no code is public): the teacher's dark knowledge lies in
the coordinate system (linear subspace) of its features; ONE forward pass of the teacher over the training
data, then PCA, gives that system; the student's features are expressed in it and the system is tailored
to the task by iterative feature selection, a mask over coordinates from which dimensions are removed step
by step, driven by accumulated gradients; the teacher is not run during training; every TCS module is linear.

(a) the teacher's pooled feature ("pre_relu"); (b) one pass without augmentation (the eval transform) over
the distillation data: the mean and principal directions of the features, and each example's coordinates
in them (`tcs_coordinates.npz`, tied to the teacher and the data); (c) a linear map of the student's pooled
feature into the k coordinates, and the coordinate mask with its accumulated gradients (non-trainable
state), both dropped at export; (d) below; (e) the targets are per example by construction: the teacher is
never run while training.

Choices this implementation makes where the paper's method section could not be read (each a field of
`config.tcs`):
- k (`tcs.dim`, 0: the student's feature width, at most the teacher's): the top-k principal directions.
- Coordinates are whitened (each divided by its standard deviation over the data), so that every coordinate
  weighs the same before the selection, which is what then decides which ones matter.
- The student trains on the same un-augmented images the coordinates were computed from (`train.augment`
  is not used), so that each target is the teacher's output for the image the student sees.
- Loss: `w * sum_j m_j mean_b (W f_s + b - z)_bj ** 2 / sum_j m_j`, the mean squared error over the kept
  coordinates (`tcs.loss_weight`).
- Selection: the gradient of the loss with respect to the mask (the kept count held fixed), `dL/dm_j`, is
  each coordinate's share of the error; its magnitude is accumulated every step, and every
  `tcs.prune_every_epochs` epochs, from
  `tcs.prune_start_epoch` on, the `tcs.prune_fraction` of the kept coordinates with the largest accumulation
  (the ones the student's features cannot express, whitened noise directions first) are removed, until
  `tcs.min_keep_fraction` of k remain; the accumulation then starts again.
"""
from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from kdep_jax import alignment as alignment_lib
from kdep_jax import data, models, teacher as teacher_lib
from kdep_jax.errors import ConfigError
from kdep_jax.methods.base import Method
from kdep_jax.methods.kdep import _differences
from kdep_jax.models.layers import torch_linear

FILE = "tcs_coordinates.npz"


class TCS(Method):
    name = "tcs"
    teacher_outputs = ("pre_relu",)
    per_example_targets = True
    train_augmentation = False

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.tcs
        self.student_dim = models.dim_from_config(config.student)
        teacher_dim = models.dim_from_config(config.teacher)
        self.dim = min(self.settings.dim or self.student_dim, teacher_dim)
        self.min_keep = max(1, int(np.ceil(self.settings.min_keep_fraction * self.dim)))

    @functools.cached_property
    def pruning_steps(self) -> tuple[int, int]:
        """(first pruning step, steps between prunings) of the selection schedule."""
        steps_per_epoch = data.dataset_info(self.config.data, self.config.data.split).num_examples // \
            self.config.train.batch_size
        return (round(self.settings.prune_start_epoch * steps_per_epoch),
                max(1, round(self.settings.prune_every_epochs * steps_per_epoch)))

    def provenance(self):
        return {"method": self.name, "dim": self.dim}

    def statistics(self, workdir, mesh, teacher):
        """{"coordinates": (num examples of the source, k) float32, rows by example index}, reused when it was
        made by this teacher on this data."""
        path = epath.Path(workdir) / FILE
        wanted = json.loads(json.dumps({**teacher_lib.data_provenance(self.config, teacher, self.config.data),
                                        "dim": self.dim}))
        if path.exists():
            with np.load(path) as stored:
                made_by = json.loads(str(stored["provenance"]))
                if made_by == wanted:
                    logging.info("Reusing the TCS coordinates in %s.", path)
                    return {"coordinates": stored["coordinates"]}
            logging.warning("The TCS coordinates in %s were made for another teacher or data (%s); recomputing them.",
                            path, ", ".join(_differences(made_by, wanted)))
        coordinates = self._coordinates(mesh, teacher)
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp"
            with tmp.open("wb") as file:
                np.savez(file, coordinates=coordinates, provenance=np.asarray(json.dumps(wanted)))
            tmp.replace(path)
        return {"coordinates": coordinates}

    def _coordinates(self, mesh, teacher) -> np.ndarray:
        """One teacher pass: PCA of the features, then every example's whitened top-k coordinates."""
        features, indices = [], []

        def kept_on_the_host(passes):  # the PCA streams the features; this process keeps its own rows too
            for batch_features, mask, index in passes:
                local = multihost_utils.global_array_to_host_local_array(batch_features, mesh,
                                                                         jax.sharding.PartitionSpec("data"))
                features.append(np.asarray(local)[index >= 0])
                indices.append(index[index >= 0])
                yield batch_features, mask

        pca = alignment_lib.fit_alignment(kept_on_the_host(teacher_lib.feature_pass(
            self.config, mesh, teacher, self.config.data, self.config.alignment.batch_size, augment=False,
            description="TCS teacher pass")))
        if pca.count <= self.dim:
            raise ConfigError(
                f"TCS needs more training examples than coordinates: {pca.count} examples for k={self.dim} "
                f"(config.tcs.dim, 0: the student's width). Lower config.tcs.dim below {pca.count} or use more data.")
        local_features, local_indices = np.concatenate(features), np.concatenate(indices)
        scale = pca.singular_values[:self.dim] / np.sqrt(max(pca.count - 1, 1))  # each coordinate's std
        local_coordinates = ((local_features - pca.mean) @ pca.components[:, :self.dim]) / np.maximum(scale, 1e-12)
        if jax.process_count() > 1:
            local_coordinates = np.concatenate(multihost_utils.process_allgather(local_coordinates.astype(np.float32)))
            local_indices = np.concatenate(multihost_utils.process_allgather(local_indices))
        source_size = int(local_indices.max()) + 1
        table = np.zeros((source_size, self.dim), np.float32)
        table[local_indices] = local_coordinates
        return table

    def example_targets(self, statistics, index):
        return statistics["coordinates"][np.asarray(index)]

    def _map(self):
        return torch_linear(self.dim, self.student_dim)

    def init_head(self, key, student_dim, statistics):
        params = self._map().init(key, jnp.zeros((1, student_dim)))["params"]
        state = {"mask": np.ones(self.dim, np.float32), "accumulated": np.zeros(self.dim, np.float32),
                 "step": np.zeros((), np.int32)}
        return params, state

    def loss(self, head, head_state, student, targets, context=None):
        predicted = self._map().apply({"params": head}, student["pre_relu"])
        errors = jnp.mean(jnp.square(predicted - targets), axis=0)  # per coordinate

        def masked_loss(mask):  # the normaliser (the kept count) is not differentiated: dL/dm_j = w * errors_j / K
            kept = jax.lax.stop_gradient(jnp.maximum(jnp.sum(mask), 1.0))
            return self.settings.loss_weight * jnp.sum(mask * errors) / kept

        loss, mask_gradient = jax.value_and_grad(masked_loss)(head_state["mask"])
        return loss, self._select(head_state, jax.lax.stop_gradient(jnp.abs(mask_gradient))), {
            "kept_coordinates": jnp.sum(head_state["mask"])}

    def _select(self, state, gradient):
        """Accumulates |dL/dm|; on a pruning step removes the kept coordinates with the largest accumulation."""
        mask, step = state["mask"], state["step"] + 1
        accumulated = state["accumulated"] + gradient * mask
        kept = jnp.sum(mask)
        start, every = self.pruning_steps
        prune = (step >= start) & (step % every == 0) & (kept > self.min_keep)
        count = jnp.minimum(jnp.floor(self.settings.prune_fraction * kept), kept - self.min_keep)
        rank = jnp.argsort(jnp.argsort(-jnp.where(mask > 0, accumulated, -jnp.inf)))  # 0: the largest kept
        new_mask = jnp.where(prune & (rank < count), 0.0, mask)
        return {"mask": new_mask, "accumulated": jnp.where(prune, 0.0, accumulated), "step": step}
