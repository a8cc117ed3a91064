"""KDEP's non-parametric feature alignment (DESIGN.md, steps 2-4).

The teacher's pooled features are centred and rotated onto the right singular vectors of the centred
N x D feature matrix; the student learns the first `dim` coordinates, squashed by power temperature
scaling (PTS). The statistics are streamed once (count, sum, sum of outer products, in float64 on the
host), combined exactly across processes, and decomposed with a float64 eigendecomposition.
"""
from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import struct
from jax.experimental import multihost_utils


@struct.dataclass
class Alignment:
    """Alignment statistics; a pytree, so it can be passed into `jax.jit`.

    mean: (D,) mean teacher feature. components: (D, D), column i is the right singular vector of the
    centred feature matrix with the i-th largest singular value. singular_values: (D,), descending, as
    `numpy.linalg.svd` of the centred matrix gives them. count: number of feature rows (static metadata).
    """

    mean: Any
    components: Any
    singular_values: Any
    count: int = struct.field(pytree_node=False)


def _row_range(index, num_rows: int) -> tuple[int, int]:
    start, stop, step = index[0].indices(num_rows)
    if step != 1:
        raise ValueError(f"Unsupported shard index {index}: rows must be a contiguous slice.")
    return start, stop


def _local_pieces(x) -> list[tuple[tuple[int, int], np.ndarray]]:
    """This process's rows of `x` as ((start, stop), rows) pieces, each global row exactly once.

    A jax.Array contributes its addressable shards with `replica_id == 0`: across all devices of all
    processes exactly one copy of each shard has replica id 0, so replicated data is counted once and
    multi-host sums stay exact. Any other array is taken as this process's own rows.
    """
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return [((0, x.shape[0]), x)]
    pieces = []
    for shard in x.addressable_shards:
        if shard.replica_id != 0:
            continue
        if x.ndim > 1 and shard.data.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"fit_alignment needs whole feature rows per shard, got a shard of shape {shard.data.shape} "
                f"of an array of shape {x.shape}; shard the batch over rows only (P('data')).")
        pieces.append((_row_range(shard.index, x.shape[0]), np.asarray(shard.data)))
    return pieces


def _mask_rows(mask, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a (B,) mask given as numpy or as a (possibly multi-host) jax.Array."""
    if not isinstance(mask, jax.Array) or mask.is_fully_addressable:
        return np.asarray(mask)[start:stop]
    for shard in mask.addressable_shards:
        lo, hi = _row_range(shard.index, mask.shape[0])
        if lo <= start and stop <= hi:
            return np.asarray(shard.data)[start - lo:stop - lo]
    raise ValueError(
        f"The mask's local shards do not hold rows {start}:{stop} of the features; "
        "shard the mask like the features (NamedSharding(mesh, P('data'))).")


class _Moments:
    """Count, mean and centred scatter, updated batch by batch (Chan et al.'s pairwise merge).

    Each batch is centred on its own mean before its outer products are taken, so a large common
    offset never enters the sum of squares and the small directions keep full float64 precision.
    """

    def __init__(self, dim: int):
        self.count = 0.0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)

    def merge(self, count: float, mean: np.ndarray, scatter: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.scatter += scatter + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def add_rows(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        mean = rows.mean(axis=0)
        centred = rows - mean
        self.merge(float(rows.shape[0]), mean, centred.T @ centred)


def _split_f32(a: np.ndarray) -> np.ndarray:
    """float64 -> stacked float32 (hi, lo) with hi + lo == a to about 48 bits (JAX's x64 is off)."""
    hi = a.astype(np.float32)
    lo = (a - hi.astype(np.float64)).astype(np.float32)
    return np.stack([hi, lo])


def _allgather_moments(local: _Moments) -> _Moments:
    """Combines every process's moments exactly and identically on every host.

    An allgather (not a psum) moves each host's float64 values as float32 hi/lo pairs (about 48 bits,
    far finer than the accumulation's own rounding), and every host merges them in the same order in
    float64, so all hosts get bit-identical statistics. Costs 8 D^2 bytes per process, once.
    """
    packed = np.concatenate([[local.count], local.mean, local.scatter.ravel()])
    gathered = np.asarray(multihost_utils.process_allgather(_split_f32(packed)), np.float64)
    per_process = gathered[:, 0] + gathered[:, 1]
    dim = local.mean.shape[0]
    total = _Moments(dim)
    for row in per_process:
        total.merge(float(np.rint(row[0])), row[1:1 + dim], row[1 + dim:].reshape(dim, dim))
    return total


def fit_alignment(batches: Iterable) -> Alignment:
    """Streams teacher features once and returns their mean and the SVD of the centred matrix.

    `batches` yields (B, D) arrays, or (features, mask) pairs whose (B,) mask marks valid rows (padded
    last batches). Arrays may be numpy (this process's rows) or global jax.Arrays sharded over rows,
    across devices and processes. Only D x D float64 accumulators are kept. The right singular vectors
    of the centred X are the eigenvectors of X^T X, and its singular values the square roots of the
    eigenvalues, so a float64 `eigh` of the D x D scatter gives the SVD without holding X. Each column's
    sign is fixed (largest-magnitude entry positive) so that runs and hosts agree.
    """
    moments = None
    for batch in batches:
        features, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if features.ndim != 2:
            raise ValueError(f"fit_alignment expects (B, D) feature batches, got shape {features.shape}.")
        if moments is None:
            moments = _Moments(features.shape[1])
        elif features.shape[1] != moments.mean.shape[0]:
            raise ValueError(
                f"Feature width changed from {moments.mean.shape[0]} to {features.shape[1]} between batches.")
        rows = []
        for (start, stop), piece in _local_pieces(features):
            if mask is not None:
                piece = piece[_mask_rows(mask, start, stop).astype(bool)]
            rows.append(piece.astype(np.float64))
        if rows:  # a process may hold no replica-0 shard of a replicated array
            moments.add_rows(np.concatenate(rows))
    if moments is None:
        raise ValueError("fit_alignment got no batches; check the dataset, split and subset it was given.")
    if jax.process_count() > 1:
        moments = _allgather_moments(moments)
    if moments.count == 0:
        raise ValueError("fit_alignment got 0 valid feature rows (every row masked out); check the data.")

    eigenvalues, eigenvectors = np.linalg.eigh(moments.scatter)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, components = eigenvalues[order], eigenvectors[:, order]
    largest = components[np.argmax(np.abs(components), axis=0), np.arange(components.shape[1])]
    components = components * np.where(largest < 0, -1.0, 1.0)
    return Alignment(
        mean=moments.mean,
        components=components,
        singular_values=np.sqrt(np.clip(eigenvalues, 0.0, None)),
        count=int(moments.count),
    )


def teacher_targets(features, alignment: Alignment, dim: int, pts_t: float = 0.1, pts_n: float | None = 3.0):
    """KDEP targets: z = (f_t - mean) @ components[:, :dim], then PTS t = sign(z) |z / T| ** (1/n).

    Computed in float32 with a full-precision matmul (the projection is tiny next to the networks, and
    bfloat16 passes would blur the small directions). `dim` must be static under `jax.jit`; `pts_n=None`
    switches PTS off and returns z.
    """
    teacher_dim = alignment.components.shape[0]
    if dim > teacher_dim:
        raise ValueError(
            f"The student feature width dim={dim} exceeds the teacher's feature width D={teacher_dim}: the "
            f"alignment can only give {teacher_dim} target coordinates. Choose a student whose feature width "
            f"is <= {teacher_dim} (or a wider teacher).")
    features = jnp.asarray(features, jnp.float32)
    mean = jnp.asarray(alignment.mean, jnp.float32)
    components = jnp.asarray(alignment.components, jnp.float32)[:, :dim]
    z = jnp.matmul(features - mean, components, precision=jax.lax.Precision.HIGHEST)
    if pts_n is None:
        return z
    return jnp.sign(z) * jnp.abs(z / pts_t) ** (1.0 / pts_n)


def save_alignment(path, alignment: Alignment, provenance: dict) -> None:
    """Writes `alignment` and its JSON-serializable `provenance` (teacher hash, data, ...) to an .npz.

    Written to a temporary name beside `path` and renamed, so a crash never leaves a half-written file
    that a later run would trust. Works for local and bucket paths (etils.epath). In a multi-process
    run, call it from one process only.
    """
    path = epath.Path(path)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        mean=np.asarray(alignment.mean, np.float64),
        components=np.asarray(alignment.components, np.float64),
        singular_values=np.asarray(alignment.singular_values, np.float64),
        count=np.asarray(alignment.count, np.int64),
        provenance=np.asarray(json.dumps(provenance, sort_keys=True)),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def load_alignment(path) -> tuple[Alignment, dict]:
    """Reads a file written by `save_alignment`; returns (alignment, provenance)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Alignment file {path} does not exist; run the alignment stage first or fix config.alignment.path.")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            alignment = Alignment(
                mean=data["mean"],
                components=data["components"],
                singular_values=data["singular_values"],
                count=int(data["count"]),
            )
            provenance = json.loads(str(data["provenance"]))
        dim = alignment.mean.shape[0]
        if alignment.components.shape != (dim, dim) or alignment.singular_values.shape != (dim,):
            raise ValueError("inconsistent array shapes")
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"Alignment file {path} is corrupt or not an alignment file ({type(e).__name__}: {e}); delete it "
            "so the alignment stage recomputes it.") from e
    return alignment, provenance
