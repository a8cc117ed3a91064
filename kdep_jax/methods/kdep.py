"""KDEP (He et al., CVPR 2022) and its ablation without power temperature scaling.

(a) the teacher's pooled pre-ReLU feature; (b) the alignment statistics: mean and right singular vectors of
the centred teacher features over the distillation data, with its training augmentation (`alignment.npz`,
tied to the teacher file and the data); (c) no head, unless `config.student.projection`: a learned linear
map of the student feature onto the k = min(student, teacher) aligned directions, the paper's parametric
alignment, which lets a student wider than its teacher learn from it; (d) `w * mean((f_s - t)**2)` with
`t = PTS((f_t - mu) @ V[:, :k])`; (e) cacheable: the target of one crop never changes.
"""
from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
from etils import epath

from kdep_jax import alignment as alignment_lib
from kdep_jax import losses, models, teacher as teacher_lib
from kdep_jax.errors import ConfigError
from kdep_jax.methods.base import Method
from kdep_jax.models.layers import torch_linear


def alignment_data(config):
    """The statistics' data: the distillation data unless the config names other data."""
    return config.alignment.data if config.alignment.data is not None else config.data


def alignment_provenance(config, teacher) -> dict:
    return teacher_lib.data_provenance(config, teacher, alignment_data(config))


def compute_or_load_alignment(config, workdir, mesh, teacher) -> alignment_lib.Alignment:
    """Reuses the statistics file when it was made by this teacher on this data, else recomputes it."""
    path = epath.Path(config.alignment.path or epath.Path(workdir) / "alignment.npz")
    wanted = json.loads(json.dumps(alignment_provenance(config, teacher)))  # as the file records it
    if path.exists():
        alignment, provenance = alignment_lib.load_alignment(path)
        made_by = {key: provenance.get(key) for key in wanted}
        if made_by == wanted:
            logging.info("Reusing the alignment statistics in %s (%d features).", path, alignment.count)
            return alignment
        logging.warning("The alignment statistics in %s were made for another teacher or data (%s); recomputing "
                        "them.", path, ", ".join(_differences(made_by, wanted)))
    stats_data = alignment_data(config)
    alignment = alignment_lib.fit_alignment(
        (features, mask) for features, mask, _ in teacher_lib.feature_pass(
            config, mesh, teacher, stats_data, config.alignment.batch_size, description="alignment statistics"))
    if jax.process_index() == 0:
        alignment_lib.save_alignment(path, alignment, {**wanted, "count": int(alignment.count)})
    logging.info("Alignment statistics from %d teacher features saved to %s.", alignment.count, path)
    return alignment


def _differences(there: dict, now: dict, prefix: str = ""):
    for key in now:
        if isinstance(now[key], dict) and isinstance(there.get(key), dict):
            yield from _differences(there[key], now[key], f"{prefix}{key}.")
        elif there.get(key) != now[key]:
            yield f"{prefix}{key}: {there.get(key)!r} there, {now[key]!r} now"


class KDEP(Method):
    name = "kdep"
    teacher_outputs = ("pre_relu",)
    cacheable = True
    use_pts = True

    def __init__(self, config):
        super().__init__(config)
        self.student_dim = models.dim_from_config(config.student)
        self.teacher_dim = models.dim_from_config(config.teacher)
        self.projection = bool(config.student.projection)
        self.dim = min(self.student_dim, self.teacher_dim) if self.projection else self.student_dim

    def check(self, teacher_dim, student_dim, teacher_classes):
        if student_dim > teacher_dim and not self.projection:
            raise ConfigError(
                f"The student {self.config.student.arch} (width {self.config.student.width}) has {student_dim}-d "
                f"features, more than the teacher {self.config.teacher.arch}'s {teacher_dim}: KDEP aligns the student "
                f"to the teacher's top-k principal directions, and the teacher has only {teacher_dim}. Learn a linear "
                f"projection of the student feature onto them: --config.student.projection=True (the paper's "
                f"parametric alignment); or choose a wider teacher or a narrower student.")

    def provenance(self):
        return {"method": self.name, "pts_t": self.config.alignment.pts_t, "pts_n": self.pts_n}

    @property
    def pts_n(self):
        return self.config.alignment.pts_n if self.use_pts else None

    def statistics(self, workdir, mesh, teacher):
        return compute_or_load_alignment(self.config, workdir, mesh, teacher)

    def constants(self, alignment):
        # Only the first k directions are used: a (D, k) slice keeps the replicated constant small.
        return alignment_lib.Alignment(mean=alignment.mean.astype("float32"),
                                       components=alignment.components[:, :self.dim].astype("float32"),
                                       singular_values=alignment.singular_values[:self.dim].astype("float32"),
                                       count=alignment.count)

    def init_head(self, key, student_dim, statistics):
        if not self.projection:
            return {}, {}
        dense = torch_linear(self.dim, student_dim)
        return dense.init(key, jnp.zeros((1, student_dim)))["params"], {}

    def targets(self, teacher_outputs, alignment):
        return alignment_lib.teacher_targets(teacher_outputs["pre_relu"], alignment, self.dim,
                                             pts_t=self.config.alignment.pts_t, pts_n=self.pts_n)

    def loss(self, head, head_state, student, targets, context=None):
        features = student["pre_relu"]
        if head:
            features = torch_linear(self.dim, self.student_dim).apply({"params": head}, features)
        return losses.feature_distillation_loss(features, targets, self.config.train.loss_weight), head_state, {}


class KDEPWithoutPTS(KDEP):
    """The paper's ablation: the same SVD alignment, the targets z without power temperature scaling."""
    name = "kdep_no_pts"
    use_pts = False
