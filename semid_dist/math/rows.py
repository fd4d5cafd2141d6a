"""Rearranging the rows of a large array without a second one (numpy only).

Fresh memory is slow to fault in: a second array as large as a shard (3 GB for 1M x 768
float32), or a second copy of the k-means sample, takes time to fault in and doubles the peak
memory (see BENCHMARKS.md). These walk the permutation's cycles instead, with one spare row.
"""

from __future__ import annotations

import numpy as np


def take_rows_in_place(rows_ND: np.ndarray, src_N: np.ndarray) -> None:
    """rows_ND[:] = rows_ND[src_N] (src_N a permutation) without a second array: each cycle of
    the permutation is walked once with one spare row."""
    n = len(src_N)
    if n == 0:
        return
    src = src_N.tolist()
    done = bytearray(n)
    spare = np.empty(rows_ND.shape[1:], rows_ND.dtype)
    for start in range(n):
        if done[start]:
            continue
        done[start] = 1
        j = src[start]
        if j == start:
            continue
        spare[...] = rows_ND[start]
        i = start
        while j != start:
            rows_ND[i] = rows_ND[j]
            done[j] = 1
            i, j = j, src[j]
        rows_ND[i] = spare
