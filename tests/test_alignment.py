"""kdep_jax.alignment against numpy float64 references (full-matrix SVD, direct PTS formula)."""
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdep_jax.alignment import Alignment, fit_alignment, load_alignment, save_alignment, teacher_targets

N, D = 3000, 128
BATCH_SIZES = [1, 7, 500, 333, 1024, 135, 1000]  # uneven, sums to N


def _features(seed=0):
    """float32 features: singular values spanning 3.5 decades, a common offset ~200x the per-dimension spread."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((N, D)))
    v, _ = np.linalg.qr(rng.standard_normal((D, D)))
    s = np.sqrt(N) * np.logspace(0, -3.5, D)
    offset = 50.0 * rng.choice([-1.0, 1.0], D) * rng.uniform(0.5, 1.5, D)
    return (u * s @ v.T + offset).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    features = _features()
    x = features.astype(np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return features, mean, s, vt.T


def _check(alignment, data):
    _, mean, s, v = data
    assert alignment.count == N
    np.testing.assert_allclose(alignment.mean, mean, rtol=0, atol=1e-9)
    sv_err = np.max(np.abs(alignment.singular_values - s) / s)
    assert sv_err < 1e-4, sv_err
    cos = np.abs(np.sum(alignment.components * v, axis=0))
    assert np.min(cos) > 1 - 1e-5, np.min(cos)
    comps = alignment.components
    assert np.all(comps[np.argmax(np.abs(comps), axis=0), np.arange(D)] > 0)  # sign convention


def _split(features, sizes=BATCH_SIZES):
    return np.split(features, np.cumsum(sizes)[:-1])


def test_test_data_defeats_naive_float32(data):
    """Sanity check of the data: a float32 X^T X - N mu mu^T loses the small directions."""
    features, _, s, _ = data
    x = features
    scatter = x.T @ x - N * np.outer(x.mean(0), x.mean(0))
    naive = np.sqrt(np.clip(np.linalg.eigvalsh(scatter.astype(np.float64))[::-1], 0, None))
    assert np.max(np.abs(naive - s) / s) > 1e-2


def test_fit_alignment_matches_full_svd(data):
    _check(fit_alignment(_split(data[0])), data)


def test_fit_alignment_masked_padding(data):
    rng = np.random.default_rng(1)
    batches = []
    for chunk in _split(data[0]):
        pad = rng.integers(0, 5)
        padded = np.concatenate([chunk, 1e3 * rng.standard_normal((pad, D)).astype(np.float32)])
        mask = np.arange(len(padded)) < len(chunk)
        perm = rng.permutation(len(padded))  # valid rows need not come first
        batches.append((padded[perm], mask[perm]))
    _check(fit_alignment(iter(batches)), data)


@pytest.mark.parametrize("num_devices", [1, 2, 4])
def test_fit_alignment_sharded_global_arrays(data, num_devices):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    *chunks, last = _split(data[0], [1000, 1000, 992, 8])
    batches = [jax.device_put(chunk, sharding) for chunk in chunks]
    # The last batch padded to 16 rows, valid and padding rows interleaved, with a sharded mask.
    padded = np.full((16, D), 7e3, np.float32)
    padded[::2] = last
    mask = np.arange(16) % 2 == 0
    batches.append((jax.device_put(padded, sharding), jax.device_put(mask, sharding)))
    _check(fit_alignment(batches), data)


def test_fit_alignment_replicated_array_counted_once(data):
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    replicated = jax.device_put(data[0], NamedSharding(mesh, P()))
    _check(fit_alignment([replicated]), data)


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import os, sys, traceback
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from kdep_jax.alignment import fit_alignment

    def main():
        features = np.load(out + "/features.npy")
        mesh = Mesh(np.array(jax.devices()), ("data",))  # 2 processes x 2 CPU devices
        sharding = NamedSharding(mesh, P("data"))
        batches = [jax.make_array_from_process_local_data(sharding, np.array_split(chunk, 2)[pid])
                   for chunk in np.split(features, [len(features) // 2])]
        pad = np.full((4, features.shape[1]), 9e3, np.float32)
        batches.append((jax.make_array_from_process_local_data(sharding, pad),
                        jax.make_array_from_process_local_data(sharding, np.zeros(4, bool))))
        replicated = jax.device_put(features, NamedSharding(mesh, P()))  # on all 4 devices: count once
        a, b = fit_alignment(batches), fit_alignment([replicated])
        np.savez(f"{out}/p{pid}.npz", mean=a.mean, components=a.components, singular_values=a.singular_values,
                 count=a.count, replicated_count=b.count, replicated_sv=b.singular_values)

    try:
        main()
    except BaseException:  # exit at once: a normal exit would wait minutes on the peer's shutdown barrier
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
""")


def test_fit_alignment_two_processes(tmp_path, data):
    """Real multi-process run (gloo on CPU): the same bits on both hosts, and the same bits as one process
    with the same 4 devices (statistics accumulated per row shard, merged by one tree, exchanged exactly)."""
    features, _, s, _ = data
    np.save(tmp_path / "features.npy", features)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    logs = [tmp_path / f"p{pid}.log" for pid in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(pid), str(tmp_path)],
                              env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT) for pid, log in enumerate(logs)]
    deadline = time.monotonic() + 120
    # A failed process leaves its peer waiting on a barrier for minutes: stop both at the first failure.
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        time.sleep(0.1)
    assert all(p.returncode == 0 for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
    results = [np.load(tmp_path / f"p{pid}.npz") for pid in (0, 1)]
    for name in results[0].files:
        np.testing.assert_array_equal(results[0][name], results[1][name])
    r = results[0]
    _check(Alignment(mean=r["mean"], components=r["components"], singular_values=r["singular_values"],
                     count=int(r["count"])), data)
    assert int(r["replicated_count"]) == N
    np.testing.assert_allclose(r["replicated_sv"], s, rtol=1e-4)

    sharding = NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), P("data"))
    batches = [jax.device_put(chunk, sharding) for chunk in np.split(features, [len(features) // 2])]
    batches.append((jax.device_put(np.full((4, D), 9e3, np.float32), sharding),
                    jax.device_put(np.zeros(4, bool), sharding)))
    one_process = fit_alignment(batches)
    for name in ("mean", "components", "singular_values"):
        np.testing.assert_array_equal(r[name], getattr(one_process, name), err_msg=name)


def test_fit_alignment_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        fit_alignment([])
    with pytest.raises(ValueError, match="0 valid feature rows"):
        fit_alignment([(np.ones((4, 8), np.float32), np.zeros(4, bool))])


def _reference_alignment(data):
    _, mean, s, v = data
    return Alignment(mean=mean, components=v, singular_values=s, count=N)


def _reference_targets(features, data, dim, t, n):
    _, mean, _, v = data
    z = (features.astype(np.float64) - mean) @ v[:, :dim]
    return z if n is None else np.sign(z) * np.abs(z / t) ** (1.0 / n)


def test_pts_matches_formula():
    """PTS alone: with mean 0 and identity components, z is the input itself."""
    z = np.array([[-2.5, -0.3, -1e-4, 0.0, 1e-4, 0.02, 0.7, 4.0]], np.float32)
    identity = Alignment(mean=np.zeros(8), components=np.eye(8), singular_values=np.ones(8), count=1)
    for t, n in [(0.1, 3.0), (0.5, 2.0)]:
        expected = np.sign(z.astype(np.float64)) * np.abs(z / t) ** (1.0 / n)
        np.testing.assert_allclose(teacher_targets(z, identity, 8, pts_t=t, pts_n=n), expected, rtol=1e-6)
    np.testing.assert_array_equal(teacher_targets(z, identity, 8, pts_n=None), z)


@pytest.mark.parametrize("pts", [(0.1, 3.0), (0.5, 2.0), (0.1, None)])
def test_teacher_targets_match_formula(data, pts):
    t, n = pts
    alignment = _reference_alignment(data)
    features = data[0][:64]
    targets = jax.jit(teacher_targets, static_argnames=("dim", "pts_t", "pts_n"))(
        features, alignment, dim=32, pts_t=t, pts_n=n)
    assert targets.shape == (64, 32) and targets.dtype == jnp.float32
    targets = np.asarray(targets, np.float64)
    z = _reference_targets(features, data, 32, t, None)
    assert (z < 0).any() and (z > 0).any()
    # Compare in z space: float32 centring of features with a ~50 offset leaves ~1e-5 absolute error in
    # z, which PTS's root amplifies without bound near z = 0; inverting PTS is well conditioned.
    z_from_targets = targets if n is None else np.sign(targets) * t * np.abs(targets) ** n
    np.testing.assert_allclose(z_from_targets, z, rtol=1e-5, atol=1e-4)
    big = np.abs(z) > 0.1
    np.testing.assert_allclose(targets[big], _reference_targets(features, data, 32, t, n)[big], rtol=1e-4)


def test_teacher_targets_bfloat16_features_give_float32(data):
    alignment = _reference_alignment(data)
    features = jnp.asarray(data[0][:16], jnp.bfloat16)
    targets = teacher_targets(features, alignment, dim=8, pts_n=None)
    assert targets.dtype == jnp.float32
    reference = _reference_targets(np.asarray(features.astype(jnp.float32)), data, 8, 0.1, None)
    np.testing.assert_allclose(np.asarray(targets), reference, rtol=1e-4, atol=1e-4)


def test_teacher_targets_dim_larger_than_teacher(data):
    with pytest.raises(ValueError, match=f"dim={D + 1} exceeds the teacher's feature width D={D}"):
        teacher_targets(data[0][:4], _reference_alignment(data), dim=D + 1)


def test_save_load_round_trip(tmp_path, data):
    alignment = fit_alignment(_split(data[0]))
    provenance = {"teacher_sha256": "ab" * 32, "dataset": "demo", "split": "train", "count": N}
    path = tmp_path / "sub" / "alignment.npz"
    save_alignment(path, alignment, provenance)
    assert sorted(p.name for p in path.parent.iterdir()) == ["alignment.npz"]  # no temp file left
    loaded, loaded_provenance = load_alignment(str(path))
    assert loaded_provenance == provenance
    assert loaded.count == alignment.count
    for name in ("mean", "components", "singular_values"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(alignment, name))
    save_alignment(path, alignment, {"teacher_sha256": "cd"})  # overwrite in place
    assert load_alignment(path)[1] == {"teacher_sha256": "cd"}


def test_load_missing_or_corrupt(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_alignment(missing)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match=str(corrupt)):
        load_alignment(corrupt)
    other = tmp_path / "other.npz"
    np.savez(other, mean=np.zeros(3))
    with pytest.raises(ValueError, match=str(other)):
        load_alignment(other)
