"""Named points where the fault matrix stops a run with a real signal (scripts/fault_matrix.py).

With KDEP_JAX_FAULT=<point>:<SIGKILL|SIGTERM>[:<n>] in the environment, the process sends itself that
signal the n-th time (default: the first) it reaches <point>; what happens next is what happens when a
scheduler or the kernel stops a real run there. Without the variable (every real run) `point` returns at
once. Points: "stage.<name>" where each pipeline stage starts (teacher, statistics, target_cache, distill,
export, transfer_kdep, transfer_scratch, results), "<loop>.step" after each call of training steps is dispatched
(teacher, distill, downstream_kdep, downstream_scratch), "<loop>.saving" while a checkpoint is being
written, "statistics.batch", "target_cache.step",
"export.converted" (the student's Flax form written, its PyTorch files not yet) and "results.written".
"""
from __future__ import annotations

import os
import signal

ENV = "KDEP_JAX_FAULT"
_reached: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, signal_name, *count = spec.split(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count[0] if count else 1):
        os.kill(os.getpid(), getattr(signal, signal_name))
