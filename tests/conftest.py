"""Test settings: CPU only, float32 matmuls at full precision, TensorFlow kept off any GPU."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Four fake CPU devices, so every test that builds a mesh can use 1, 2 or 4 of them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
from kdep_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # the suite tests what `python -m kdep_jax.main` runs

# torchvision segfaults when it is imported after TensorFlow (torchvision 0.29.1, TF 2.21): load it first.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_default_matmul_precision", "highest")
# The end-to-end tests compile the same networks several times: let them share compiled programs.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "kdep_jax_test_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
