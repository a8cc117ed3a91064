"""Metrics to `metrics.jsonl` and TensorBoard, and a progress bar, all on process 0 only."""
from __future__ import annotations

import json
import time

import jax
from etils import epath
from tqdm.auto import tqdm


class MetricWriter:
    """Writes one JSON object per logged step, plus TensorBoard scalars.

    On a resume, rows logged after the restored step (written before the run was killed) are dropped,
    so the file reads exactly as that of an uninterrupted run. The whole file is rewritten on each
    flush: it stays small, and rewriting works on buckets, where appending does not.
    """

    def __init__(self, workdir, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.rows: list[dict] = []
        self._summary_writer = None
        if not self.enabled:
            return
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resume_step:
                    self.rows.append(row)
        import tensorflow as tf  # TensorFlow is already a dependency of the input pipeline.

        self._summary_writer = tf.summary.create_file_writer(str(workdir))
        self._tf = tf

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self._summary_writer.as_default(step=int(step)):
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tf.summary.scalar(name, value)
        self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        tmp.replace(self.path)
        self._summary_writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._summary_writer.close()


def _to_python(value):
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


class Progress:
    """A progress bar counting images, so it shows images/s and the ETA; silent off process 0."""

    def __init__(self, description: str, total_steps: int, start_step: int, images_per_step: int):
        self.images_per_step = images_per_step
        self.bar = None
        if jax.process_index() == 0:
            self.bar = tqdm(total=total_steps * images_per_step, initial=start_step * images_per_step,
                            desc=description, unit="img", unit_scale=True, dynamic_ncols=True, smoothing=0.1)
        self._last_time = time.perf_counter()
        self._images_since = 0

    def update(self, steps: int = 1) -> None:
        self._images_since += steps * self.images_per_step
        if self.bar is not None:
            self.bar.update(steps * self.images_per_step)

    def images_per_sec(self) -> float:
        """Throughput since the last call (what the log rows record)."""
        now = time.perf_counter()
        rate = self._images_since / max(now - self._last_time, 1e-9)
        self._last_time, self._images_since = now, 0
        return rate

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
