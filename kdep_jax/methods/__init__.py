"""The distillation objectives, one small module each, behind one interface (`base.Method`).

`config.method` picks one; `create(config)` builds it. KDEP and its paper's ablations (kdep.py, kdep_conv.py),
logit distillation without labels (logits.py: Hinton KD, SSLD and its cross-entropy variant, function
matching), TCS (tcs.py) and ScaleKD (scalekd.py: Swin or ViT teachers into CNNs). METHODS.md beside DESIGN.md
holds each one's facts and sources.
"""
from __future__ import annotations

from kdep_jax.errors import ConfigError
from kdep_jax.methods.base import LossContext, Method
from kdep_jax.methods.kdep import KDEP, KDEPWithoutPTS
from kdep_jax.methods.kdep_conv import KDEPRegressor
from kdep_jax.methods.logits import SSLD, FunctionMatching, LogitKD, SSLDCrossEntropy
from kdep_jax.methods.scalekd import ScaleKD
from kdep_jax.methods.tcs import TCS

METHODS: dict[str, type[Method]] = {method.name: method for method in (
    KDEP, KDEPWithoutPTS, KDEPRegressor, LogitKD, SSLD, SSLDCrossEntropy, FunctionMatching, TCS, ScaleKD)}


def create(config) -> Method:
    """The method `config.method` names, built for this config."""
    if config.method not in METHODS:
        raise ConfigError(f"config.method={config.method!r} is not a method; known methods: {', '.join(METHODS)}.")
    return METHODS[config.method](config)


__all__ = ["METHODS", "LossContext", "Method", "create"]
