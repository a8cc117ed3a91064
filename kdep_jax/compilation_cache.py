"""XLA's persistent compilation cache for the command line: a rerun (a resume after a preemption, the demo
again) loads the programs an earlier run compiled instead of compiling them again, as does any run that needs one
of them (the same network, batch and step). On the Zen 4 `AMD EPYC` (family 25 model 17) the demo compiles for
19 s in its first run and for 6 s in a second one (JAX caches the programs that took a second or more to compile).
A cached executable is the program the compiler would build again: no number changes.

The default directory holds one subdirectory per CPU model and instruction set, since XLA:CPU compiles for the
CPU it runs on and a home directory shared by machines of several CPU families must not hand one's programs to
another.
"""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from absl import logging

from kdep_jax import xla_flags

OFF = "off"


def cpu_tag(cpuinfo: str | None = None) -> str:
    """A short name for this CPU: vendor, family, model and instruction-set flags, hashed (the machine's
    architecture where /proc/cpuinfo is missing)."""
    cpu = xla_flags.first_cpu(cpuinfo)
    identity = [cpu.get(key, "") for key in ("vendor_id", "cpu family", "model")]
    identity.append(" ".join(sorted(cpu.get("flags", "").split())) or platform.machine())
    return hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]


def user_cache_dir() -> Path:
    """~/.cache/kdep_jax (under `$XDG_CACHE_HOME` when set): what kdep_jax compiles for this machine, XLA's
    programs here and its C++ kernels (models/cpu_kernels.py)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdep_jax"


def default_dir(cpuinfo: str | None = None) -> Path:
    """`$JAX_COMPILATION_CACHE_DIR` when set, else ~/.cache/kdep_jax/xla/<cpu_tag()>."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return user_cache_dir() / "xla" / cpu_tag(cpuinfo)


def enable(directory: str | None = None) -> str | None:
    """Turns the cache on in `directory` (default_dir() when None; a bucket URL works too) or, given "off",
    off. Returns the directory in use, None when off; a local directory that cannot be created turns it off
    with a warning rather than failing the run."""
    import jax

    if directory == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = str(directory or default_dir())
    if "://" not in directory:
        directory = os.path.expanduser(directory)
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            logging.warning("Compiled programs are not cached between runs: cannot create %s (%s). Every run "
                            "compiles them again; --compilation_cache=DIR names a writable directory.",
                            directory, error)
            jax.config.update("jax_enable_compilation_cache", False)
            return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
