"""Synthetic interaction logs for the evaluate tests: users who walk between embedding neighbours.

Each user starts at a random item and moves, one interaction at a time, to one of the current
item's nearest neighbours (cosine) that they have not visited yet. The next item is then
predictable from the embedding space, which semantic IDs encode and shuffled IDs do not.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def neighbour_walks(
    ids_N: np.ndarray, x_ND: np.ndarray, n_users: int, length: int, k: int = 8, seed: int = 0
) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = x_ND / np.linalg.norm(x_ND, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nn_NK = np.argsort(-sim, axis=1)[:, : 4 * k]  # spare neighbours for when the nearest were visited
    users, items, ts = [], [], []
    for u in range(n_users):
        cur, seen = int(rng.integers(len(ids_N))), set()
        for t in range(length):
            seen.add(cur)
            users.append(u)
            items.append(cur)
            ts.append(1_000_000 * u + 60 * t)
            fresh = [j for j in nn_NK[cur] if j not in seen][:k]
            cur = int(rng.choice(fresh)) if fresh else int(rng.integers(len(ids_N)))
    return pa.table(
        {
            "UserID": pa.array(np.asarray(users, np.int64) + 7000),
            "ItemID": pa.array(ids_N[np.asarray(items)].astype(np.int64)),
            "timestamp": pa.array(np.asarray(ts, np.int64)),
        }
    )


def write_walks(path: str, ids_N: np.ndarray, x_ND: np.ndarray, **kw) -> pa.Table:
    t = neighbour_walks(ids_N, x_ND, **kw)
    pq.write_table(t, path)
    return t
