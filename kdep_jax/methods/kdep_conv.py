"""The KDEP paper's parametric baseline: a learned regressor instead of the SVD alignment.

(a) the teacher's pooled pre-ReLU feature, as it is (D_t wide); (b) no statistics; (c) a linear map (a 1x1
conv on the pooled feature) from the student's feature onto the teacher's, dropped at export; (d)
`w * mean((W f_s + b - f_t)**2)`; (e) cacheable.
"""
from __future__ import annotations

import jax.numpy as jnp

from kdep_jax import losses, models
from kdep_jax.methods.base import Method
from kdep_jax.models.layers import torch_linear


class KDEPRegressor(Method):
    name = "kdep_conv"
    teacher_outputs = ("pre_relu",)
    cacheable = True

    def __init__(self, config):
        super().__init__(config)
        self.student_dim = models.dim_from_config(config.student)
        self.teacher_dim = models.dim_from_config(config.teacher)

    def _regressor(self):
        return torch_linear(self.teacher_dim, self.student_dim)

    def init_head(self, key, student_dim, statistics):
        return self._regressor().init(key, jnp.zeros((1, student_dim)))["params"], {}

    def targets(self, teacher_outputs, constants):
        return teacher_outputs["pre_relu"]

    def loss(self, head, head_state, student, targets, context=None):
        regressed = self._regressor().apply({"params": head}, student["pre_relu"])
        return losses.feature_distillation_loss(regressed, targets, self.config.train.loss_weight), head_state, {}
