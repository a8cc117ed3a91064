"""The training loop with several steps per call: the same losses, logs, checkpoints and parameters as one per call."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdep_jax import parallel, trainer


def loss_fn(params, batch_stats, batch, constants, rng):
    """A linear regression with a random term, so that the steps' random stream is checked too."""
    error = batch["x"] @ params["w"] - batch["y"]
    loss = jnp.mean(error**2) + 0.01 * jax.random.normal(rng, ()) * jnp.sum(params["w"])
    return loss, (batch_stats, {"abs_error": jnp.mean(jnp.abs(error))})


def batches(start):
    """Batch `step` is a function of the step, as the input pipeline's are."""
    step = start
    while True:
        rng = np.random.default_rng(step)
        yield {"x": rng.normal(size=(8, 16)).astype(np.float32), "y": rng.normal(size=(8, 1)).astype(np.float32)}
        step += 1


def fit(workdir, steps_per_call, num_steps=11):
    mesh = parallel.make_mesh()  # the four fake devices: the stacked batches are sharded along their second axis
    schedule = optax.piecewise_constant_schedule(0.05, {6: 0.1})
    tx = optax.sgd(schedule, momentum=0.9)
    state = trainer.create_train_state({"params": {"w": np.zeros((16, 1), np.float32)}}, tx, mesh, seed=0)
    settings = trainer.LoopSettings(name="fit", num_steps=num_steps, images_per_step=8, log_every_steps=3,
                                    steps_per_call=steps_per_call, checkpoint_every_steps=5,
                                    checkpoint_every_secs=None, keep_checkpoints=10, eval_every_steps=4)
    step = trainer.make_train_step(loss_fn, tx, mesh, steps_per_call)
    counts = []

    def recorded_step(state, stacked, count, constants):
        counts.append(int(parallel.to_host(count)))
        return step(state, stacked, count, constants)

    result = trainer.fit(workdir=workdir, settings=settings, state=state, train_step=recorded_step, constants=(),
                         batches=batches, mesh=mesh, lr_schedule=schedule,
                         evaluate=lambda state: {"w_norm": float(np.linalg.norm(parallel.to_host(state.params["w"])))})
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_sec", None)
    checkpoints = sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())
    return parallel.to_host(result.state), rows, checkpoints, counts


def test_several_steps_per_call_train_as_one_per_call(tmp_path):
    one_state, one_rows, one_checkpoints, one_counts = fit(tmp_path / "one", steps_per_call=1)
    four_state, four_rows, four_checkpoints, four_counts = fit(tmp_path / "four", steps_per_call=4)
    assert one_counts == [1] * 11
    # Each call stops at the next step that logs (every 3), saves (every 5), evaluates (every 4) or ends (11).
    assert four_counts == [3, 1, 1, 1, 2, 1, 1, 1]
    assert four_rows == one_rows
    assert [row["step"] for row in one_rows if "loss" in row] == [3, 5, 6, 9, 10, 11]
    assert [row["step"] for row in one_rows if "w_norm" in row] == [4, 8, 11]
    assert four_checkpoints == one_checkpoints == [5, 10, 11]
    jax.tree.map(np.testing.assert_array_equal, four_state, one_state)
    assert int(four_state.step) == 11
