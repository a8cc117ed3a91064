"""kdep_jax: knowledge distillation as efficient pre-training (KDEP, CVPR 2022) in JAX/Flax."""

__version__ = "0.1.0"
