"""Test settings: the CPU, float32 matmuls at full precision, TensorFlow kept off any GPU.

KDEP_TEST_PLATFORM=cuda runs JAX on the GPU instead (benchmarks/gpu_check.sh: the models' tests that need no CPU
kernel, on a lent GPU machine); PyTorch's references stay on the CPU.
"""
import os
import tempfile

PLATFORM = os.environ.setdefault("KDEP_TEST_PLATFORM", "cpu")
os.environ["JAX_PLATFORMS"] = PLATFORM
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if PLATFORM == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Four fake CPU devices, so every test that builds a mesh can use 1, 2 or 4 of them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
# The end-to-end tests compile the same networks several times, here and in the runs and notebook kernels they start
# as subprocesses (which inherit this environment): let them all share compiled programs, as `python -m kdep_jax.main`
# shares them between runs (kdep_jax.compilation_cache: one directory per CPU). A cached executable is the program the
# compiler would build again, so no result changes.
from kdep_jax import compilation_cache  # noqa: E402  (imports neither JAX nor TensorFlow)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kdep_jax_test_xla_cache",
                                                                compilation_cache.cpu_tag()))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # the same programs here as in the subprocesses
from kdep_jax import xla_flags  # noqa: E402

xla_flags.apply_defaults()  # the suite tests what `python -m kdep_jax.main` runs

# torchvision segfaults when it is imported after TensorFlow (torchvision 0.29.1, TF 2.21): load it first.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import jax  # noqa: E402

jax.config.update("jax_platforms", PLATFORM)
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

import runpy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kdep_jax import config_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32  # torchvision's networks run at 32 px: small inputs, the same code path


def override(config, overrides: dict):
    """Sets dotted fields ({"train.lr": 0.01}) of a ConfigDict; returns it."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for name in parents:
            target = target[name]
        target[leaf] = value
    return config


def tiny_config(variant: str = "tiny", **overrides):
    """configs/demo.py:<variant>, loaded as `--config=` loads it, with dotted overrides."""
    return override(runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"](variant), overrides)


def small_kdep_config(**overrides):
    """A ResNet-50 (width 0.25, 512-d) teacher and a ResNet-18 (width 0.25, 128-d) student, demo data at 32 px."""
    config = config_lib.kdep_config()
    config.teacher.update(arch="resnet50", width=0.25)
    config.student.update(arch="resnet18", width=0.25)
    config.data = config_lib.data_config()
    config.data.image_size = IMAGE_SIZE
    return override(config, overrides)


def small_transfer_config(**overrides):
    """A ResNet-18 at a quarter width on the 32 px demo downstream task: 2 steps of 48 images, one eval."""
    config = config_lib.supervised_config()
    config.model.width = 0.25
    config.data.update(name="demo", split="downstream_train", eval_split="downstream_test", image_size=IMAGE_SIZE)
    config.train.update(batch_size=48, num_epochs=1, lr=0.1)
    config.eval_batch_size = 48  # 500 test images: the last batch is padded
    config.log_every_steps = 1
    return override(config, overrides)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: `-p no:xdist` runs the suite without it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker more than CPUs. The end-to-end tests leave CPUs idle while they import, trace and wait
    on their subprocesses: on the 2-core Zen 4 AMD EPYC, with the compilation cache filled, the suite took 619 and
    659 s on 3 workers against 691 and 675 s on 2. A first run, busy compiling, gains nothing (1016 s against 1004)."""
    if config.option.numprocesses == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cpus + 1
    return None
