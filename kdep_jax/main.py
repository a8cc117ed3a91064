"""Command line: python -m kdep_jax.main --config=configs/r18.py --workdir=DIR [--config.key=value ...]"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kdep_jax import xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "An experiment file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go (a path or bucket URL).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Let JAX detect a TPU pod slice or a Slurm cluster.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Where compiled programs are kept for later runs (default: $JAX_COMPILATION_CACHE_DIR, "
    "else ~/.cache/kdep_jax/xla/<this CPU>); 'off' compiles everything in every run.")
flags.mark_flags_as_required(["config", "workdir"])


def _only_our_info(record) -> bool:
    """Keeps libraries' INFO chatter (orbax logs every array it writes) out of the run's log."""
    return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    xla_flags.apply_defaults()  # before JAX starts a backend, which reads them once
    from kdep_jax import compilation_cache, parallel  # imports jax; distributed init must come before any device use
    from kdep_jax.errors import UserError

    cache = compilation_cache.enable(_COMPILATION_CACHE.value)  # before anything compiles
    try:
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value)
    except UserError as error:
        raise app.UsageError(str(error)) from None
    from kdep_jax import pipeline

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_our_info)
    if cache:
        logging.info("Compiled programs are cached in %s (--compilation_cache=off turns this off).", cache)
    try:
        outputs = pipeline.run(_CONFIG.value, _WORKDIR.value)
    except UserError as error:  # anything else is a bug and keeps its traceback
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    import jax

    if jax.process_index() == 0:
        print(json.dumps(outputs, indent=2))


def _parse_flags(argv):
    """absl's flag parsing, with an override of a config field that does not exist reported in one line, exit
    status 2, rather than as ml_collections' AttributeError with a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as error:
        while error.args and isinstance(error.args[0], BaseException):  # ml_collections wraps a KeyError
            error = error.args[0]
        detail = " ".join(str(error.args[0] if error.args else error).split())
        print(f"error: a --config.* flag names a field the config does not have: {detail}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
