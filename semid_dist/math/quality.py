"""How good a set of semantic IDs is, beyond collisions: how evenly codes are used (Gini), how
large the groups of items sharing all L codes are, and whether the codes mean something
(semantic coherence: do nearest neighbours in the embedding space share their first codes more
often than random pairs do?). Pure numpy (faiss for the kNN); the quality report renders them.
"""

from __future__ import annotations

import numpy as np

from semid_dist.math.dedup import row_groups


def gini(counts_K: np.ndarray) -> float:
    """Gini coefficient of code usage over all K codes of a level (dead codes count as 0):
    0 when every code holds as many items, (K-1)/K when one code holds them all."""
    c = np.sort(np.asarray(counts_K, dtype=np.float64).ravel())
    k, total = c.size, c.sum()
    if k == 0 or total <= 0:
        return 0.0
    # mean absolute difference over all ordered pairs / (2 * mean), from the sorted values
    rank = np.arange(1, k + 1, dtype=np.float64)
    return float(((2 * rank - k - 1) * c).sum() / (k * total))


def group_size_histogram(codes_NL: np.ndarray) -> dict:
    """How many groups of items sharing all L codes have each size: {"sizes": [1, 2, ...],
    "groups": [n1, n2, ...]} in increasing size (size 1 = an item alone with its codes)."""
    codes_NL = np.asarray(codes_NL)
    if codes_NL.shape[0] == 0:
        return {"sizes": [], "groups": []}
    return histogram_of_sizes(np.bincount(row_groups(codes_NL.reshape(codes_NL.shape[0], -1))[0]))


def histogram_of_sizes(sizes_G: np.ndarray) -> dict:
    """group_size_histogram from the groups' sizes."""
    sizes, groups = np.unique(np.asarray(sizes_G), return_counts=True)
    return {"sizes": sizes.astype(int).tolist(), "groups": groups.astype(int).tolist()}


def _pair_share(keys_S: np.ndarray) -> float:
    """The share of distinct (unordered) pairs of the sample with the same key: the probability
    that two different items drawn at random share it, sum_c n_c (n_c - 1) / (S (S - 1))."""
    s = keys_S.shape[0]
    if s < 2:
        return 0.0
    n_c = np.bincount(keys_S).astype(np.float64)
    return float((n_c * (n_c - 1)).sum() / (s * (s - 1)))


def _knn(x_SD: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest other rows by cosine similarity, (S, k), the row itself excluded."""
    import faiss

    x = np.ascontiguousarray(x_SD, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.where(norms > 0, norms, 1.0)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, nn = index.search(x, k + 1)
    s = x.shape[0]
    # drop the row itself wherever it came back (ties may put a duplicate first); else the last
    own = nn == np.arange(s)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(nn, dtype=bool)
    keep[np.arange(s), drop] = False
    return nn[keep].reshape(s, k)


def coherence(x_SD: np.ndarray, codes_SL: np.ndarray, k: int = 10) -> dict:
    """Semantic coherence on a sample (embeddings and their codes): the share of each item's k
    nearest neighbours (cosine, within the sample) that share its first code, and its first two
    codes, against the same shares for two different items drawn at random (exact). With fewer
    than k+1 items, k drops to S-1; with one level, the two-code shares repeat the first code's."""
    x_SD, codes_SL = np.asarray(x_SD), np.asarray(codes_SL)
    s = int(x_SD.shape[0])
    assert codes_SL.shape[0] == s, "one row of codes per embedding"
    codes_SL = codes_SL.reshape(s, -1)
    depth = min(2, codes_SL.shape[1])
    first_S = row_groups(codes_SL[:, :1])[0] if s else np.zeros(0, np.int64)
    two_S = row_groups(codes_SL[:, :depth])[0] if s else np.zeros(0, np.int64)
    k = max(0, min(int(k), s - 1))
    out = {"sample": s, "k": k, "knn_same_first": None, "knn_same_first_two": None}
    if k > 0:
        nn_SK = _knn(x_SD, k)
        out["knn_same_first"] = float((first_S[nn_SK] == first_S[:, None]).mean())
        out["knn_same_first_two"] = float((two_S[nn_SK] == two_S[:, None]).mean())
    out["random_same_first"] = _pair_share(first_S)
    out["random_same_first_two"] = _pair_share(two_S)
    return out
