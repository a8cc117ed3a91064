"""Scale-out and reliability on one CPU machine, through the real command line.

Every run here is `python -m kdep_jax.main --config=configs/demo.py:tiny` at a quarter width (teacher
training, alignment statistics, distillation, export, both downstream runs, results.json), started by the
test as subprocesses (bounded in time, free ports, every child killed on failure):

- the reference: 1 process with 2 CPU devices, never interrupted;
- 2 processes with 1 CPU device each (gloo collectives), SIGTERM'd to both mid-distillation as a
  scheduler would, then rerun with the same command: bit-identical teacher, alignment statistics, losses,
  student and results.json to the reference;
The fault matrix (tests/test_faults.py, scripts/fault_matrix.py) stops a 1-process run at every stage with
SIGKILL and SIGTERM, a half-written checkpoint included, and checks its exact resume.

The suite's persistent compilation cache (conftest.py), which the runs inherit, keeps the reruns from
compiling again; cached executables are the same programs, so it does not change any number compared here.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from kdep_jax import alignment as alignment_lib
from kdep_jax import convert
from conftest import REPO

WIDTH = 0.25  # ResNet-18s of 128-d features: the same code path, a fraction of the work
NUM_STEPS = 8  # distillation: 2 epochs of the tiny demo data (152 images, batches of 32); logs and checkpoints every
# 2 steps, so that each call runs 2 steps (trainer.make_train_step), their batches stacked across the processes
RUN_TIMEOUT = 900  # seconds for one launch (the first ones compile everything on a shared 2-core machine)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


class _Launch:
    """One launch of the command line as `num_processes` processes with `devices` CPU devices each."""

    def __init__(self, ctx, workdir: Path, name: str, num_processes: int = 1, devices: int = 2):
        self.logs = [ctx.logdir / f"{name}.p{i}.log" for i in range(num_processes)]
        args = [sys.executable, "-m", "kdep_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
                f"--config.teacher.width={WIDTH}", f"--config.teacher.train.model.width={WIDTH}",
                f"--config.student.width={WIDTH}", f"--config.downstream.model.width={WIDTH}",
                "--config.train.num_epochs=2", "--config.log_every_steps=2"]  # calls of 2 distillation steps
        port = _free_port() if num_processes > 1 else None
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.procs = []
        for i, log in enumerate(self.logs):
            extra = [] if port is None else [f"--coordinator_address=localhost:{port}",
                                             f"--num_processes={num_processes}", f"--process_id={i}"]
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(args + extra, cwd=REPO, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))
            ctx.children.append(self.procs[-1])
        self.deadline = time.monotonic() + RUN_TIMEOUT

    def log(self, i: int = 0) -> str:
        return self.logs[i].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {log.name} (last lines) ---\n" + "\n".join(log.read_text(errors="replace")
                                                                       .splitlines()[-40:]) for log in self.logs)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def _check_alive(self) -> None:
        # A failed process leaves its peers waiting on a barrier for minutes: stop them all at once.
        failed = [p.returncode for p in self.procs if p.returncode is not None and p.returncode != 0]
        if failed or time.monotonic() > self.deadline:
            self.kill()
            pytest.fail(f"{'timed out' if not failed else f'exit codes {failed}'}:\n{self.all_logs()}")

    def wait(self) -> list[int]:
        """Waits for every process to exit; fails (killing the rest) on the first error or the deadline."""
        while any(p.poll() is None for p in self.procs):
            self._check_alive()
            time.sleep(0.05)
        self._check_alive()
        return [p.returncode for p in self.procs]

    def wait_for(self, condition, what: str) -> None:
        """Polls `condition` while the processes run; fails if they exit (or time out) first."""
        while not condition():
            self._check_alive()
            if all(p.poll() is not None for p in self.procs):
                pytest.fail(f"The run ended before {what}:\n{self.all_logs()}")
            time.sleep(0.02)

    def signal(self, signum) -> None:
        for p in self.procs:
            p.send_signal(signum)


class _Context:
    def __init__(self, root: Path):
        self.root = root
        self.logdir = root / "logs"
        self.logdir.mkdir()
        self.children: list[subprocess.Popen] = []


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    context = _Context(tmp_path_factory.mktemp("multihost"))
    yield context
    for p in context.children:  # nothing outlives the tests, whatever failed
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def runs(ctx):
    """The reference and the 2-process run (SIGTERM'd, then resumed), started side by side."""
    reference, multi = ctx.root / "reference", ctx.root / "multi"
    ref = _Launch(ctx, reference, "reference")
    first = _Launch(ctx, multi, "multi_first", num_processes=2, devices=1)
    # SIGTERM both processes once the second distillation step is logged (inside the loop, where it is handled).
    first.wait_for(lambda: _logged_steps(multi) >= 2, "distillation step 2 was logged")
    first.signal(signal.SIGTERM)
    first_codes = first.wait()
    stopped_at = _logged_steps(multi)
    second = _Launch(ctx, multi, "multi_second", num_processes=2, devices=1)
    second_codes = second.wait()
    ref_codes = ref.wait()
    return {"reference": reference, "multi": multi, "ref_codes": ref_codes, "first": first,
            "first_codes": first_codes, "stopped_at": stopped_at, "second": second, "second_codes": second_codes}


def _logged_steps(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _leaves(directory: Path):
    variables, _ = convert.load_converted(directory, "resnet18")
    return jax.tree_util.tree_leaves_with_path(variables)


def _student(workdir: Path):
    return _leaves(workdir / "student")


def test_two_processes_match_one_process(runs):
    """Every stage, bit for bit, as the README promises: the same 2 devices, in 1 process or spread over 2 (with the
    library's default XLA flags; the alignment statistics are merged by a layout-independent tree)."""
    assert runs["ref_codes"] == [0] and runs["second_codes"] == [0, 0]
    reference, multi = runs["reference"], runs["multi"]
    ref_rows, multi_rows = _metrics(reference), _metrics(multi)
    assert [r["step"] for r in ref_rows] == [r["step"] for r in multi_rows] == list(range(2, NUM_STEPS + 1, 2))
    assert [(r["loss"], r["lr"]) for r in multi_rows] == [(r["loss"], r["lr"]) for r in ref_rows], (
        [r["loss"] for r in ref_rows], [r["loss"] for r in multi_rows])
    for (path, a), (_, b) in zip(_leaves(multi / "teacher" / "model"), _leaves(reference / "teacher" / "model"),
                                 strict=True):
        np.testing.assert_array_equal(a, b, err_msg="teacher" + jax.tree_util.keystr(path))
    ref_alignment, _ = alignment_lib.load_alignment(reference / "alignment.npz")
    multi_alignment, _ = alignment_lib.load_alignment(multi / "alignment.npz")
    assert multi_alignment.count == ref_alignment.count == 152
    for name in ("mean", "components", "singular_values"):
        np.testing.assert_array_equal(getattr(multi_alignment, name), getattr(ref_alignment, name), err_msg=name)
    for (path, a), (_, b) in zip(_student(multi), _student(reference), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    results = json.loads((reference / "results.json").read_text())
    assert {row["init"] for row in results} == {"kdep", "scratch"}
    assert json.loads((multi / "results.json").read_text()) == results


def test_only_process_zero_writes_logs_and_the_export(runs):
    multi, second = runs["multi"], runs["second"]
    pids = {str(p.pid) for p in runs["first"].procs[:1] + second.procs[:1]}
    events = list(multi.glob("events.out.tfevents.*"))
    assert events and all(name.name.split(".")[-3] in pids for name in events), (events, pids)
    assert (multi / "student" / "meta.json").exists() and (multi / "student.safetensors").exists()
    assert '"student"' in second.log(0) and '"student"' not in second.log(1)  # the outputs, printed once
    assert "img/s" not in second.log(1)  # no progress bar off process 0


def test_sigterm_on_two_processes_saves_and_exits_zero(runs):
    first, stopped_at = runs["first"], runs["stopped_at"]
    assert runs["first_codes"] == [0, 0], first.all_logs()
    assert 2 <= stopped_at < NUM_STEPS
    for i in (0, 1):
        assert f"stopped at step {stopped_at} after a SIGTERM" in first.log(i)
    assert '"preempted": true' in first.log(0)
    assert f"resuming from the checkpoint at step {stopped_at}" in runs["second"].log(0)
