"""Tries each bad input through the command line and prints the README's table: what the user sees, what is kept.

    python scripts/bad_inputs.py [--workdir DIR]

Every case is a real `python -m kdep_jax.main` (or `python -m kdep_jax.convert`) run on the tiny demo, from a
fresh directory or from one finished tiny run; its exit status, the first line of its error and what is left in
its workdir afterwards are recorded. A case passes when the run exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/demo.py:tiny_distill", "--config.teacher.width=0.25", "--config.student.width=0.25"]


def run(args, workdir: Path | None = None, module: str = "kdep_jax.main", devices: int = 1
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", module, *args, *([f"--workdir={workdir}"] if workdir else [])]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "FATAL"))]
    return (lines[0] if lines else result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "").strip()


def kept(workdir: Path | None) -> str:
    if workdir is None or not workdir.exists():
        return "nothing written"
    return ", ".join(sorted(p.name for p in workdir.iterdir())) or "an empty directory"


def cases(root: Path, teacher: Path, finished: Path):
    """(what, args, workdir, module, CPU devices) of each bad input."""
    corrupt = root / "corrupt_images" / "train"
    corrupt.mkdir(parents=True)
    from PIL import Image

    for i in range(40):
        Image.fromarray(np.full((40, 40, 3), 5 * i, np.uint8)).save(corrupt / f"{i:02d}.png")
    (corrupt / "40.png").write_bytes(b"not a png")
    teacher_args = [f"--config.teacher.path={teacher}", "--config.teacher.arch=resnet18"]
    return [
        ("a misspelt config field", [*TINY, "--config.train.lrr=0.1"], root / "typo", "kdep_jax.main"),
        ("a teacher path that does not exist", [*TINY, f"--config.teacher.path={root}/nowhere"], root / "t1",
         "kdep_jax.main"),
        ("a teacher checkpoint of another arch", [*TINY, f"--config.teacher.path={teacher}",
                                                 "--config.teacher.arch=resnet50"], root / "t2", "kdep_jax.main"),
        ("an unknown method", [*TINY, *teacher_args, "--config.method=kdpe"], root / "m1", "kdep_jax.main"),
        ("a logit method, teacher converted without its classifier",
         [*TINY, f"--config.teacher.path={finished / 'student'}", "--config.method=ssld"], root / "m2",
         "kdep_jax.main"),
        ("a student wider than the teacher (no projection)",
         [*TINY, *teacher_args, "--config.student.width=1.0"], root / "w1", "kdep_jax.main"),
        ("a student module that cannot be imported",
         [*TINY, *teacher_args, "--config.student.arch=my_nets:Net"], root / "s1", "kdep_jax.main"),
        ("a batch that does not split over the devices (4 here)",
         [*TINY, *teacher_args, "--config.train.batch_size=30"], root / "b1", "kdep_jax.main", 4),
        ("no learning-rate decay period", [*TINY, *teacher_args, "--config.train.lr_decay_every_epochs=0"],
         root / "d1", "kdep_jax.main"),
        ("an image folder that does not exist", [*TINY, *teacher_args, "--config.data.name=image_folder",
                                                 f"--config.data.data_dir={root}/no_images"], root / "f1",
         "kdep_jax.main"),
        ("a corrupt image in the data", [*TINY, *teacher_args, "--config.data.name=image_folder",
                                         f"--config.data.data_dir={corrupt.parent}", "--config.data.split=train",
                                         "--config.data.subset=1000", "--config.train.batch_size=8"],  # subset: every image
         root / "c1", "kdep_jax.main"),
        ("the target cache on a bucket", [*TINY, *teacher_args, "--config.target_cache.enabled=True"],
         "gs://no-bucket/run", "kdep_jax.main"),
        ("a transfer init that does not exist", ["--config=configs/transfer/cifar100.py",
                                                 "--config.init=kdep:no_such_run"], root / "i1", "kdep_jax.main"),
        ("the workdir of another run", [*TINY, *teacher_args, "--config.train.lr=0.5"], finished, "kdep_jax.main"),
        ("a divergence (lr 1e30)", [*TINY, *teacher_args, "--config.train.lr=1e30", "--config.log_every_steps=1"],
         root / "n1", "kdep_jax.main"),
        ("converting a checkpoint of another arch",
         ["import", "--arch", "resnet50", "--input", str(finished / "student.safetensors"), "--output",
          str(root / "converted")], None, "kdep_jax.convert"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kdep_bad_inputs_"))
    root.mkdir(parents=True, exist_ok=True)
    finished = root / "finished"
    setup = run(["--config=configs/demo.py:tiny", "--config.teacher.width=0.25",
                 "--config.teacher.train.model.width=0.25", "--config.student.width=0.25",
                 "--config.downstream.model.width=0.25"], finished)
    if setup.returncode != 0:
        print(setup.stderr[-3000:])
        return 1
    teacher = finished / "teacher" / "model"
    rows, ok = [], True
    for what, case_args, workdir, module, *devices in cases(root, teacher, finished):
        before = kept(workdir) if isinstance(workdir, Path) and workdir == finished else None
        result = run(case_args, workdir, module, *devices)
        clean = result.returncode == 2 and "Traceback" not in result.stderr
        ok &= clean
        after = kept(workdir) if isinstance(workdir, Path) else "nothing written"
        kept_text = "the run's files, unchanged" if before is not None and before == after else after
        message = error_line(result).replace("|", "\\|")
        rows.append(f"| {what} | {result.returncode} | {message[:300]} | {kept_text} |")
    print("| bad input | exit | what the user sees (first line) | what is left in the workdir |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
