"""Checkpoints under a relative workdir, as `--workdir=runs/demo` gives them."""
import jax.numpy as jnp
import numpy as np

from kdep_jax import checkpointing


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3)}
    checkpointer = checkpointing.Checkpointer("runs/demo/checkpoints")
    checkpointer.save(3, state, {"note": "test"})
    checkpointer.wait()
    assert checkpointer.latest_step() == 3 and (tmp_path / "runs/demo/checkpoints/3").is_dir()
    restored, meta = checkpointer.restore({"w": jnp.zeros((2, 3)), "step": jnp.asarray(0)})
    checkpointer.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 3 and meta == {"note": "test"}
