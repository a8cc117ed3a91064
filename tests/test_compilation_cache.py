"""kdep_jax.compilation_cache: the command line keeps compiled programs for later runs, one directory per CPU."""
import json
import os
import subprocess
import sys

from kdep_jax import compilation_cache
from kdep_jax.models import cpu_kernels
from conftest import REPO
from test_xla_flags import AMD_AVX2_CPUINFO, INTEL_AMX_CPUINFO

# `python -m kdep_jax.main` with the pipeline replaced by one small program, compiled (or loaded from the cache):
# prints the cache hits it saw.
_MAIN_WITH_ONE_PROGRAM = """import sys
import jax, jax.numpy as jnp
from kdep_jax import main, pipeline
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
def run(config, workdir):
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
    return {"cache_hits": len(hits)}
pipeline.run = run
sys.argv[0] = "kdep_jax.main"
main.run()
"""


def test_each_cpu_gets_a_directory_of_its_own(monkeypatch, tmp_path):
    zen4 = AMD_AVX2_CPUINFO.replace("cpu family\t: 23", "cpu family\t: 25\nmodel\t\t: 17")
    zen4_other_model = zen4.replace("model\t\t: 17", "model\t\t: 97")  # the same flags, another model
    tags = {compilation_cache.cpu_tag(text) for text in (AMD_AVX2_CPUINFO, INTEL_AMX_CPUINFO, zen4, zen4_other_model)}
    assert len(tags) == 4
    assert compilation_cache.cpu_tag(INTEL_AMX_CPUINFO) == compilation_cache.cpu_tag(INTEL_AMX_CPUINFO)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tag = compilation_cache.cpu_tag(INTEL_AMX_CPUINFO)
    assert compilation_cache.default_dir(INTEL_AMX_CPUINFO) == tmp_path / "kdep_jax" / "xla" / tag
    monkeypatch.delenv("KDEP_JAX_KERNEL_CACHE", raising=False)
    assert cpu_kernels.cache_dir() == tmp_path / "kdep_jax" / "kernels"  # beside it, the C++ kernels' builds
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert compilation_cache.default_dir(INTEL_AMX_CPUINFO) == tmp_path / "mine"


def _main(tmp_path, *flags):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the suite's own cache
    result = subprocess.run([sys.executable, "-c", _MAIN_WITH_ONE_PROGRAM, "--config=configs/demo.py:tiny",
                             f"--workdir={tmp_path / 'run'}", *flags], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])["cache_hits"], result.stderr


def test_a_second_run_loads_what_the_first_compiled_and_off_turns_it_off(tmp_path):
    directory = tmp_path / "cache" / "kdep_jax" / "xla" / compilation_cache.cpu_tag()
    hits, log = _main(tmp_path)
    assert hits == 0 and f"Compiled programs are cached in {directory}" in log
    written = sorted(path.name for path in directory.iterdir())
    assert written
    hits, _ = _main(tmp_path)
    assert hits >= 1
    hits, log = _main(tmp_path / "elsewhere", "--compilation_cache=off")
    assert hits == 0 and "cached in" not in log and not (tmp_path / "elsewhere" / "cache").exists()
    assert sorted(path.name for path in directory.iterdir()) == written


def test_a_cache_directory_that_cannot_be_made_warns_and_the_run_goes_on(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    code = ("import jax, jax.numpy as jnp\n"
            "from kdep_jax import compilation_cache\n"
            "print(compilation_cache.enable())\n"
            "print(float(jax.jit(jnp.sum)(jnp.ones(3))))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["None", "3.0"]
    assert "Compiled programs are not cached between runs: cannot create" in result.stderr
    assert "--compilation_cache=DIR" in result.stderr
