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
