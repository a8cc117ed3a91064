"""Your own architecture as the student: any Flax module called like kdep_jax's backbones.

    python -m kdep_jax.main --config=configs/demo.py --workdir=runs/custom \
        --config.student.arch=examples.custom_student:TinyNet --config.student.projection=True \
        --config.downstream.model.arch=examples.custom_student:TinyNet

kdep_jax builds it as TinyNet(num_classes=..., dtype=...) and calls apply(variables, images, train=...). It returns
(logits, features): logits None when num_classes is None; features["pre_relu"] the pooled (B, D) feature KDEP
distils (before the last nonlinearity), features["pooled"] what the classifier sees, and optionally the stage maps.
"""
import flax.linen as nn
import jax.numpy as jnp


class TinyNet(nn.Module):
    num_classes: int | None = 1000
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = {}
        x = x.astype(self.dtype)
        for stage, channels in enumerate((32, 64, 128, 256), start=1):  # strides 2, 4, 8, 16
            x = nn.Conv(channels, (3, 3), strides=2, use_bias=False, dtype=self.dtype)(x)
            pre_relu = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
            x = nn.relu(pre_relu)
            features[f"stage{stage}"] = x.astype(jnp.float32)
        features["pre_relu"] = pre_relu.mean(axis=(1, 2)).astype(jnp.float32)
        features["pooled"] = x.mean(axis=(1, 2)).astype(jnp.float32)
        logits = None
        if self.num_classes is not None:
            logits = nn.Dense(self.num_classes, dtype=self.dtype)(features["pooled"]).astype(jnp.float32)
        return logits, features
