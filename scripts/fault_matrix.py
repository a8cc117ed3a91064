"""The fault matrix: the tiny demo stopped by SIGKILL and by SIGTERM at every stage boundary and inside every
stage, each time rerun with the same command, must end with the same results.json as an uninterrupted run.

    python scripts/fault_matrix.py --workdir runs/faults             # both signals, every point (about 35 runs)
    python scripts/fault_matrix.py --workdir runs/faults --signals SIGTERM --stages teacher,distillation
    (tests/test_faults.py runs a sample of it: every stage once, the signals and the stopping points by turns)

Each signal gets one workdir and one chain of launches of `python -m kdep_jax.main --config=configs/demo.py:tiny`
(with the teacher-target cache on, so that its stage is in the matrix): launch k is stopped at fault k by
`kdep_jax.faults` (the process sends itself the signal at that point, as a scheduler or the kernel would), and
launch k+1 is the same command, which resumes and is stopped at fault k+1; a last launch runs to the end. Every
launch must stop where its fault is (SIGKILL: killed; SIGTERM inside a training loop: the checkpoint saved and
exit 0; SIGTERM elsewhere: terminated), and the chain's results.json, student and losses must equal the
uninterrupted run's, bit for bit (the README's determinism promise: same machine, devices and threads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The tiny demo at a quarter width with the target cache: every stage, a few steps each.
OVERRIDES = ("--config.teacher.width=0.25", "--config.teacher.train.model.width=0.25", "--config.student.width=0.25",
             "--config.downstream.model.width=0.25", "--config.target_cache.enabled=True")


@dataclasses.dataclass(frozen=True)
class Fault:
    stage: str
    where: str  # "boundary" (before the stage starts), "inside", or "saving" (while a checkpoint is written)
    point: str  # a kdep_jax.faults point
    count: int = 1  # stop the n-th time the point is reached (inside a loop: after a checkpoint was saved)

    def in_training_loop(self) -> bool:
        return self.point.endswith((".step", ".saving")) and self.point != "target_cache.step"


# In pipeline order. The tiny demo: teacher 4 steps, alignment 3 batches, target cache and distillation 4 steps,
# each downstream run 3 steps; checkpoints every 2 steps.
FAULTS = (
    Fault("teacher", "boundary", "stage.teacher"), Fault("teacher", "inside", "teacher.step", 3),
    Fault("alignment statistics", "boundary", "stage.statistics"),
    Fault("alignment statistics", "inside", "statistics.batch", 2),
    Fault("target cache", "boundary", "stage.target_cache"), Fault("target cache", "inside", "target_cache.step", 2),
    Fault("distillation", "boundary", "stage.distill"), Fault("distillation", "inside", "distill.step", 3),
    Fault("distillation", "saving", "distill.saving"),
    Fault("export", "boundary", "stage.export"), Fault("export", "inside", "export.converted"),
    Fault("downstream (KDEP)", "boundary", "stage.transfer_kdep"),
    Fault("downstream (KDEP)", "inside", "downstream_kdep.step", 2),
    Fault("downstream (scratch)", "boundary", "stage.transfer_scratch"),
    Fault("downstream (scratch)", "inside", "downstream_scratch.step", 2),
    Fault("report", "boundary", "stage.results"), Fault("report", "inside", "results.written"),
)
SIGNALS = ("SIGKILL", "SIGTERM")


@dataclasses.dataclass
class Stop:
    fault: Fault
    signal: str
    exit_code: int
    as_expected: bool
    seconds: float


def launch(workdir: Path, env: dict, log: Path, fault: Fault | None = None, signal_name: str = "") -> tuple[int, str]:
    """One run of the command; returns (exit code, its output)."""
    env = dict(env)
    if fault is not None:
        env["KDEP_JAX_FAULT"] = f"{fault.point}:{signal_name}:{fault.count}"
    command = [sys.executable, "-m", "kdep_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
               *OVERRIDES]
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode
    return code, log.read_text(errors="replace")


def expected_stop(fault: Fault, signal_name: str, code: int, output: str) -> bool:
    """Did the launch stop at its fault, the way that signal stops a run there?"""
    if signal_name == "SIGKILL":
        return code == -signal.SIGKILL
    if fault.in_training_loop():  # the loop saves a checkpoint at the step boundary and exits cleanly
        return code == 0 and '"preempted": true' in output
    return code == -signal.SIGTERM


def run_chain(name: str, workdir: Path, env: dict, stops_planned: list[tuple[Fault, str]]) -> list[Stop]:
    """Stops the run at each (fault, signal) in turn, then lets it finish; returns what each stop did."""
    stops = []
    for index, (fault, signal_name) in enumerate(stops_planned):
        start = time.monotonic()
        code, output = launch(workdir, env, workdir.parent / f"{workdir.name}.{index:02d}.log", fault, signal_name)
        stops.append(Stop(fault, signal_name, code, expected_stop(fault, signal_name, code, output),
                          time.monotonic() - start))
    code, output = launch(workdir, env, workdir.parent / f"{workdir.name}.final.log")
    if code != 0:
        raise RuntimeError(f"The last launch of the {name} chain failed ({code}):\n{output[-4000:]}")
    return stops


def outcome(workdir: Path) -> dict:
    """What must not change: results.json, the student's bytes, the distillation losses; and nothing half-written
    may be left in any checkpoints/ directory."""
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"results": json.loads((workdir / "results.json").read_text()),
            "student": (workdir / "student" / "variables.msgpack").read_bytes(),
            "losses": [(row["step"], row["loss"]) for row in metrics if "loss" in row],
            "incomplete checkpoints": sorted(str(path.relative_to(workdir))
                                             for path in workdir.glob("**/checkpoints/*") if "tmp" in path.name)}


def environment(cache_dir: Path) -> dict:
    """CPU only, and a compilation cache that the launches share: the caller's (the test suite's), else cache_dir."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            **os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(REPO)}


def full_plan(stages=None) -> dict[str, list[tuple[Fault, str]]]:
    """Every fault with every signal (of the given stages): one chain per signal."""
    faults = [fault for fault in FAULTS if not stages or fault.stage.split(" ")[0] in stages]
    return {name: [(fault, name) for fault in faults] for name in SIGNALS}


def sampled_plan() -> dict[str, list[tuple[Fault, str]]]:
    """The test suite's sample, one chain: every stage stopped once, at its boundary or inside by turns, by SIGKILL
    or SIGTERM by turns (so each signal stops runs at boundaries and inside loops), and a SIGKILL while a
    checkpoint is being written (what leaves a half-written one behind)."""
    stages = list(dict.fromkeys(fault.stage for fault in FAULTS))
    planned = []
    for index, stage in enumerate(stages):
        where = "boundary" if index % 2 == 0 else "inside"
        fault = next(fault for fault in FAULTS if fault.stage == stage and fault.where == where)
        planned.append((fault, SIGNALS[(index // 2) % 2]))
    planned += [(fault, "SIGKILL") for fault in FAULTS if fault.where == "saving"]
    return {"sampled": sorted(planned, key=lambda stop: FAULTS.index(stop[0]))}


def run_matrix(root: Path, plan: dict[str, list[tuple[Fault, str]]]) -> dict:
    """The uninterrupted reference and each chain of `plan`, side by side; returns the stops and whether each
    chain ended equal to the reference."""
    root.mkdir(parents=True, exist_ok=True)
    env = environment(root / "compilation_cache")
    with futures.ThreadPoolExecutor(len(plan) + 1) as pool:
        reference = pool.submit(launch, root / "reference", env, root / "reference.log")
        chains = {name: pool.submit(run_chain, name, root / name, env, planned) for name, planned in plan.items()}
        code, output = reference.result()
        if code != 0:
            raise RuntimeError(f"The uninterrupted run failed ({code}):\n{output[-4000:]}")
        stops = {name: chain.result() for name, chain in chains.items()}
    expected = outcome(root / "reference")
    return {"stops": stops, "equal": {name: outcome(root / name) == expected for name in plan}}


def table(matrix: dict) -> str:
    """The README's table: one row per fault, one column per signal."""
    by_fault = {(stop.fault, stop.signal): stop for stops in matrix["stops"].values() for stop in stops}
    signals = [name for name in SIGNALS if any(signal == name for _, signal in by_fault)]
    lines = ["| stage | where | " + " | ".join(signals) + " |", "|---|---|" + "---|" * len(signals)]
    for fault in FAULTS:
        stops = [by_fault.get((fault, name)) for name in signals]
        if any(stops):
            cells = ["–" if stop is None else "stopped, resumed" if stop.as_expected else
                     f"UNEXPECTED exit {stop.exit_code}" for stop in stops]
            lines.append(f"| {fault.stage} | {fault.where} | " + " | ".join(cells) + " |")
    equal = ", ".join(f"{name}: {'equal' if same else 'DIFFERENT'}" for name, same in matrix["equal"].items())
    tried = sum(len(stops) for stops in matrix["stops"].values())
    recovered = sum(stop.as_expected for stops in matrix["stops"].values() for stop in stops)
    return "\n".join(lines) + (f"\n\n{tried} stops tried, {recovered} stopped where and as expected and resumed; "
                               f"final results.json, student, losses and checkpoints vs the uninterrupted run: "
                               f"{equal}.\n")


def succeeded(matrix: dict) -> bool:
    return all(matrix["equal"].values()) and all(stop.as_expected for stops in matrix["stops"].values()
                                                 for stop in stops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--signals", default=",".join(SIGNALS))
    parser.add_argument("--stages", default="", help="comma-separated stage names (default: all)")
    args = parser.parse_args(argv)
    stages = {name.strip() for name in args.stages.split(",") if name.strip()}
    plan = {name: planned for name, planned in full_plan(stages).items() if name in args.signals.split(",")}
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kdep_fault_matrix_"))
    start = time.monotonic()
    matrix = run_matrix(root, plan)
    print(table(matrix))
    print(f"({time.monotonic() - start:.0f} s; logs in {root})")
    return 0 if succeeded(matrix) else 1


if __name__ == "__main__":
    sys.exit(main())
