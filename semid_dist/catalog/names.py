"""String ItemIDs at the driver: one Arrow array, sorted bytewise (UTF-8), and each item's rank
in it standing in for the ItemID in every rule that orders or matches items (dedup order,
relocation ties, the nightly ID rules), so that those rules stay integer code (math/)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def as_names(a) -> pa.Array:
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    return a.cast(pa.large_string())


def common_ranks(*arrays) -> tuple[pa.Array, list[np.ndarray]]:
    """The union of string arrays, sorted bytewise without repeats, and each array's ranks in
    it (int64): equal strings get equal ranks, and rank order is byte order."""
    parts = [as_names(a) for a in arrays]
    everything = pa.concat_arrays(parts) if parts else pa.array([], pa.large_string())
    order = pc.sort_indices(everything).to_numpy()
    s = everything.take(order)
    first = np.ones(len(s), bool)
    if len(s) > 1:
        first[1:] = ~pc.equal(s.slice(1), s.slice(0, len(s) - 1)).to_numpy(zero_copy_only=False)
    ranks = np.empty(len(s), np.int64)
    ranks[order] = np.cumsum(first) - 1
    splits = np.cumsum([len(p) for p in parts])[:-1]
    return s.filter(pa.array(first)), np.split(ranks, splits)


def sorted_ids(ids) -> tuple[np.ndarray | pa.Array, np.ndarray]:
    """A run's ItemIDs sorted ascending, and the order that sorts them: int64 numpy for integer
    ItemIDs, one large_string Arrow array (bytewise UTF-8 order, which is Python's str order)
    for string ones."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if is_names(ids):
        order = pc.sort_indices(ids).to_numpy()
        return as_names(ids).take(order), order
    ids_N = ids.to_numpy().astype(np.int64)
    order = np.argsort(ids_N, kind="stable")
    return ids_N[order], order


def is_names(ids) -> bool:
    """Whether ids (an array of ItemIDs: numpy or Arrow) holds strings."""
    t = ids.type if isinstance(ids, (pa.Array, pa.ChunkedArray)) else None
    return t is not None and (pa.types.is_string(t) or pa.types.is_large_string(t))


def ids_kind(ids) -> str:
    """ "string" or "integer": the kind of a run's ItemIDs (as sorted_ids gives them)."""
    return "string" if is_names(ids) else "integer"


def positions(values, ids_N) -> np.ndarray:
    """int64: each of values' position in ids_N (sorted ascending, unique, as ``sorted_ids``
    gives), -1 where absent. values and ids_N hold ItemIDs of one kind (integer or string)."""
    if is_names(ids_N):
        if not isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = pa.array(list(values), pa.large_string())
        idx = pc.index_in(values.cast(pa.large_string()), value_set=ids_N)
        return idx.fill_null(-1).to_numpy().astype(np.int64, copy=False)
    v = values.to_numpy() if isinstance(values, (pa.Array, pa.ChunkedArray)) else values
    v = np.asarray(v).astype(np.int64, copy=False)
    idx = np.searchsorted(ids_N, v)
    if not len(ids_N):
        return np.full(v.shape, -1, np.int64)
    found = ids_N[np.minimum(idx, len(ids_N) - 1)] == v  # searchsorted gives N past the largest
    return np.where(found, idx, -1).astype(np.int64, copy=False)
