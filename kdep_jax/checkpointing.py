"""Training checkpoints with orbax: asynchronous, atomic, the last K kept.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; the half-written one is ignored on restore and removed.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:
    def __init__(self, directory, keep: int = 3):
        # Orbax refuses relative paths ("runs/demo" from the command line); bucket URLs are left as they are.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        incomplete = [p.name for p in self.directory.glob("*") if "tmp" in p.name] if self.directory.exists() else []
        if incomplete:
            logging.warning("Ignoring incomplete checkpoints in %s (a run was stopped while saving); they are "
                            "removed, the complete ones are kept: %s", self.directory, ", ".join(sorted(incomplete)))
        # cleanup_tmp_directories: orbax deletes those half-written directories (on process 0) as it starts.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Starts an asynchronous save; training goes on while it is written."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, like_state, step: int | None = None):
        """Restores `(state, meta)` with the structure, dtypes and shardings of `like_state`."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def delete_from(self, step: int) -> None:
        """Deletes the checkpoints at `step` and after (their parameters led to a divergence)."""
        for saved in self.manager.all_steps():
            if saved >= step:
                self.manager.delete(saved)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
