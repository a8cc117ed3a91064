"""KDEP's non-parametric feature alignment (DESIGN.md, steps 2-4).

The teacher's pooled features are centred and rotated onto the right singular vectors of the centred
N x D feature matrix; the student learns the first `dim` coordinates, squashed by power temperature
scaling (PTS). The statistics are streamed once (count, mean and centred scatter, in float64 on the
host, one accumulator per row shard of the batch), merged by a fixed pairwise tree, exchanged bit for bit
across processes, and decomposed with a float64 eigendecomposition: the same devices spread over one or
several processes give bit-identical statistics.
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


def _row_blocks(x: jax.Array) -> dict[int, tuple[int, int, int]]:
    """{leaf: (start, stop, owning process)} for the row blocks of a global array.

    A leaf is one row block (shard) of the batch. Its owner, the lowest process holding a copy, counts
    its rows once, so replicated data is counted once whatever the layout.
    """
    blocks = {}
    for device, index in x.sharding.devices_indices_map(x.shape).items():
        start, stop = _row_range(index, x.shape[0])
        leaf = start // max(stop - start, 1)
        owner = min(device.process_index, blocks.get(leaf, (start, stop, device.process_index))[2])
        blocks[leaf] = (start, stop, owner)
    return blocks


def _leaf_layout(x) -> tuple[int, dict[int, int]]:
    """(number of leaves, {leaf: owning process}); a host array is one leaf per process (its own rows)."""
    if not isinstance(x, jax.Array):
        return jax.process_count(), {p: p for p in range(jax.process_count())}
    blocks = _row_blocks(x)
    return len(blocks), {leaf: owner for leaf, (_, _, owner) in blocks.items()}


def _local_pieces(x) -> list[tuple[int, tuple[int, int], np.ndarray]]:
    """The (leaf, (start, stop), rows) pieces of `x` this process owns, each global row exactly once."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return [(jax.process_index(), (0, x.shape[0]), x)]
    blocks = _row_blocks(x)
    pieces = {}
    for shard in x.addressable_shards:
        if x.ndim > 1 and shard.data.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"fit_alignment needs whole feature rows per shard, got a shard of shape {shard.data.shape} "
                f"of an array of shape {x.shape}; shard the batch over rows only (P('data')).")
        start, stop = _row_range(shard.index, x.shape[0])
        leaf = start // max(stop - start, 1)
        if blocks[leaf][2] == jax.process_index() and leaf not in pieces:
            pieces[leaf] = (leaf, (start, stop), np.asarray(shard.data))
    return list(pieces.values())


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


def _merged(a: _Moments, b: _Moments) -> _Moments:
    total = _Moments(a.mean.shape[0])
    total.merge(a.count, a.mean, a.scatter)
    total.merge(b.count, b.mean, b.scatter)
    return total


def _pairwise(nodes: list[_Moments]) -> _Moments:
    """Merges level by level, ((0, 1), (2, 3)), ...: the order depends only on the number of nodes, and an
    aligned block of 2^m consecutive leaves is one node of the tree."""
    while len(nodes) > 1:
        nodes = [_merged(*nodes[i:i + 2]) if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def _pack(moments: list[_Moments]) -> np.ndarray:
    """float64 values as uint32 pairs: an allgather moves them bit for bit (JAX's x64 is off)."""
    packed = np.stack([np.concatenate([[m.count], m.mean, m.scatter.ravel()]) for m in moments])
    return packed.view(np.uint32)


def _unpack(packed: np.ndarray, dim: int) -> list[_Moments]:
    moments = []
    for row in np.ascontiguousarray(packed).view(np.float64):
        m = _Moments(dim)
        m.count, m.mean, m.scatter = float(row[0]), row[1:1 + dim].copy(), row[1 + dim:].reshape(dim, dim).copy()
        moments.append(m)
    return moments


def _combine(leaves: dict[int, _Moments], num_leaves: int, owners: dict[int, int], dim: int) -> _Moments:
    """All leaves merged by the same pairwise tree on every layout, identically on every process.

    When each process owns an aligned block of 2^m leaves (1, 2, 4 or 8 devices per host), that block is
    one node of the tree: it is merged locally and only one D x D node per process is exchanged. Otherwise
    every leaf is gathered. The exchange is exact, so 1 process x N devices and P processes x N/P devices
    give bit-identical statistics.
    """
    processes = jax.process_count()
    owned = [[i for i in range(num_leaves) if owners[i] == p] for p in range(processes)]
    local = [leaves.get(i, _Moments(dim)) for i in owned[jax.process_index()]]
    if processes == 1:
        return _pairwise(local)
    block = num_leaves // processes
    if num_leaves % processes == 0 and block & (block - 1) == 0 and all(
            mine == list(range(p * block, (p + 1) * block)) for p, mine in enumerate(owned)):
        gathered = np.asarray(multihost_utils.process_allgather(_pack([_pairwise(local)])))
        return _pairwise([m for rows in gathered for m in _unpack(rows, dim)])
    most = max(len(mine) for mine in owned)  # every process sends as many leaves, empty ones as padding
    padded = local + [_Moments(dim)] * (most - len(local))
    gathered = np.asarray(multihost_utils.process_allgather(_pack(padded)))
    by_leaf = {i: m for mine, rows in zip(owned, gathered) for i, m in zip(mine, _unpack(rows, dim))}
    return _pairwise([by_leaf[i] for i in range(num_leaves)])


def fit_alignment(batches: Iterable) -> Alignment:
    """Streams teacher features once and returns their mean and the SVD of the centred matrix.

    `batches` yields (B, D) arrays, or (features, mask) pairs whose (B,) mask marks valid rows (padded
    last batches). Arrays may be numpy (this process's rows) or global jax.Arrays sharded over rows,
    across devices and processes. Only D x D float64 accumulators are kept, one per local shard. The
    right singular vectors of the centred X are the eigenvectors of X^T X, and its singular values the
    square roots of the eigenvalues, so a float64 `eigh` of the D x D scatter gives the SVD without
    holding X. Each column's sign is fixed (largest-magnitude entry positive) so that runs and hosts agree.
    """
    leaves: dict[int, _Moments] = {}
    layout = None
    dim = None
    for batch in batches:
        features, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if features.ndim != 2:
            raise ValueError(f"fit_alignment expects (B, D) feature batches, got shape {features.shape}.")
        if dim is None:
            dim, layout = features.shape[1], _leaf_layout(features)
        elif features.shape[1] != dim:
            raise ValueError(f"Feature width changed from {dim} to {features.shape[1]} between batches.")
        elif _leaf_layout(features) != layout:
            raise ValueError("fit_alignment needs every batch sharded the same way (the same number of shards).")
        for leaf, (start, stop), piece in _local_pieces(features):
            if mask is not None:
                piece = piece[_mask_rows(mask, start, stop).astype(bool)]
            leaves.setdefault(leaf, _Moments(dim)).add_rows(piece.astype(np.float64))
    if dim is None:
        raise ValueError("fit_alignment got no batches; check the dataset, split and subset it was given.")
    moments = _combine(leaves, *layout, dim)
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
