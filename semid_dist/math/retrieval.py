"""Ranking metrics of a retriever and paired bootstrap intervals over users (numpy only).

A query has exactly one relevant item, its target, and the retriever returns a ranked list of
item indices, best first, padded with -1. The metrics are read off the target's 1-based rank in
that list (0: not retrieved): Recall@k is 1 when the rank is in 1..k, NDCG@k is 1/log2(rank + 1)
there (one relevant item, so the ideal DCG is 1). A padding -1 never matches a target.

A variant's score is the micro average over all targets: the sum of the per-target values over
the number of targets. Every variant is scored on the same targets, so the comparison is paired,
and targets of one user are not independent (one user's taste drives them all), so the interval
resamples users, not targets: replicate b draws U users with replacement, the same draw for every
variant, and its estimate of variant v is (w_b . sums_v) / (w_b . counts) with w_b the number of
times each user was drawn. Intervals are percentile intervals of the replicates; a difference of
two variants takes its interval from the differences of the same replicates.

Users without a target contribute nothing to either sum; they are dropped before resampling, so
the bootstrap draws among the users who have targets and no replicate can have a zero count (a
bucket's interval resamples the users with targets in that bucket). To score a bucket of targets
(e.g. ``frequency_buckets``), mask the targets and sum per user again::

    sums_VU, counts_U = user_sums(values_VQ, user_Q, n_users, mask_Q=bucket_Q == b)
    boot = paired_bootstrap(sums_VU, counts_U)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Multiplicities drawn per chunk of replicates (int64 each): the bootstrap's memory beyond its
# inputs is a few arrays of this many elements, whatever the number of users and replicates.
BOOT_CHUNK = 1 << 21


def hit_ranks(recs_QK: np.ndarray, target_Q: np.ndarray) -> np.ndarray:
    """The 1-based position of target_Q[q] in recs_QK[q] (its first occurrence), 0 when absent;
    int64 (Q,). Entries < 0 are padding and never match."""
    recs_QK, target_Q = np.asarray(recs_QK), np.asarray(target_Q)
    if recs_QK.ndim != 2 or target_Q.shape != (recs_QK.shape[0],):
        raise ValueError(f"recs must be (Q, K) and target (Q,), got {recs_QK.shape} and {target_Q.shape}")
    if recs_QK.shape[1] == 0:
        return np.zeros(recs_QK.shape[0], np.int64)
    match_QK = (recs_QK == target_Q[:, None]) & (recs_QK >= 0)
    first_Q = match_QK.argmax(axis=1)
    return np.where(match_QK.any(axis=1), first_Q + 1, 0).astype(np.int64)


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recall_at(rank_Q: np.ndarray, k: int) -> np.ndarray:
    """1.0 per target whose rank is in 1..k, else 0.0 (float64)."""
    _check_k(k)
    rank_Q = np.asarray(rank_Q)
    return ((rank_Q >= 1) & (rank_Q <= k)).astype(np.float64)


def ndcg_at(rank_Q: np.ndarray, k: int) -> np.ndarray:
    """1/log2(rank + 1) per target whose rank is in 1..k, else 0.0 (float64)."""
    _check_k(k)
    rank_Q = np.asarray(rank_Q)
    hit_Q = (rank_Q >= 1) & (rank_Q <= k)
    # rank 0 would give 1/log2(1) = inf: take the log of a safe rank and mask afterwards
    return np.where(hit_Q, 1.0 / np.log2(np.where(hit_Q, rank_Q, 1) + 1.0), 0.0)


def per_user(values_Q: np.ndarray, user_Q: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the values of each user, float64 (n_users,); number of targets of each user, int64)."""
    values_Q, user_Q = np.asarray(values_Q), np.asarray(user_Q)
    if values_Q.shape != user_Q.shape or values_Q.ndim != 1:
        raise ValueError(f"values and users must be (Q,) alike, got {values_Q.shape} and {user_Q.shape}")
    if user_Q.size and (user_Q.dtype.kind not in "iu" or user_Q.min() < 0 or user_Q.max() >= n_users):
        raise ValueError(f"users must be integers in 0..{n_users - 1}")
    sum_U = np.bincount(user_Q, weights=values_Q.astype(np.float64), minlength=n_users)
    return sum_U, np.bincount(user_Q, minlength=n_users).astype(np.int64)


def user_sums(
    values_VQ: np.ndarray, user_Q: np.ndarray, n_users: int, mask_Q: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """per_user for V variants scored on the same targets, keeping only the targets in mask_Q
    (all when None): (sums_VU float64, counts_U int64), the input of paired_bootstrap."""
    values_VQ = np.atleast_2d(np.asarray(values_VQ))
    user_Q = np.asarray(user_Q)
    if mask_Q is not None:
        mask_Q = np.asarray(mask_Q, bool)
        if mask_Q.shape != user_Q.shape:
            raise ValueError(f"mask must be (Q,) like users, got {mask_Q.shape}")
        values_VQ, user_Q = values_VQ[:, mask_Q], user_Q[mask_Q]
    sums_VU = np.empty((values_VQ.shape[0], n_users), np.float64)
    counts_U = np.zeros(n_users, np.int64)
    for v, values_Q in enumerate(values_VQ):
        sums_VU[v], counts_U = per_user(values_Q, user_Q, n_users)
    return sums_VU, counts_U


@dataclass(frozen=True)
class Bootstrap:
    """Point estimates, percentile intervals and the replicates (B, V) of V paired variants."""

    point_V: np.ndarray
    lo_V: np.ndarray
    hi_V: np.ndarray
    reps_BV: np.ndarray
    level: float

    def diff(self, a: int, b: int) -> tuple[float, float, float]:
        """(point_a - point_b, lo, hi): the interval of the difference from the same replicates."""
        lo, hi = _percentiles(self.reps_BV[:, a] - self.reps_BV[:, b], self.level)
        return float(self.point_V[a] - self.point_V[b]), float(lo), float(hi)


def _percentiles(reps_B: np.ndarray, level: float) -> np.ndarray:
    tail = 50.0 * (1.0 - level)
    return np.percentile(reps_B, [tail, 100.0 - tail], axis=0)


def paired_bootstrap(
    sums_VU: np.ndarray, counts_U: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Bootstrap:
    """Micro averages sum_u sums_VU[v, u] / sum_u counts_U[u] of V variants, with percentile
    intervals at `level` from n_boot paired resamplings of the users (see the module docstring).
    Deterministic for a seed; memory beyond the inputs is bounded by BOOT_CHUNK, not by B x U."""
    sums_VU = np.atleast_2d(np.asarray(sums_VU, np.float64))
    counts_U = np.asarray(counts_U)
    if counts_U.ndim != 1 or sums_VU.shape[1] != counts_U.shape[0]:
        raise ValueError(f"sums must be (V, U) and counts (U,), got {sums_VU.shape} and {counts_U.shape}")
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    if counts_U.dtype.kind not in "iu" or (counts_U < 0).any():
        raise ValueError("counts must be non-negative integers")
    has_U = counts_U > 0
    if not has_U.any():
        raise ValueError("no targets: every count is 0")
    if (sums_VU[:, ~has_U] != 0).any():
        raise ValueError("a user without targets has a non-zero sum")
    sums_VU, counts_U = sums_VU[:, has_U], counts_U[has_U].astype(np.float64)
    point_V = sums_VU.sum(axis=1) / counts_U.sum()
    reps_BV = _replicates(sums_VU, counts_U, n_boot, np.random.default_rng(seed))
    lo_V, hi_V = _percentiles(reps_BV, level)
    return Bootstrap(point_V, lo_V, hi_V, reps_BV, level)


def _replicates(sums_VU: np.ndarray, counts_U: np.ndarray, n_boot: int, rng) -> np.ndarray:
    """(B, V) replicate estimates, drawing the multiplicities of a chunk of replicates at a time."""
    n_users = counts_U.shape[0]
    per_chunk = max(1, BOOT_CHUNK // n_users)
    reps_BV = np.empty((n_boot, sums_VU.shape[0]), np.float64)
    for s in range(0, n_boot, per_chunk):
        c = min(per_chunk, n_boot - s)
        draw_CU = rng.integers(0, n_users, size=(c, n_users))
        draw_CU += np.arange(c, dtype=draw_CU.dtype)[:, None] * n_users  # one bincount for the chunk
        w_CU = np.bincount(draw_CU.ravel(), minlength=c * n_users).reshape(c, n_users).astype(np.float64)
        del draw_CU
        den_C = w_CU @ counts_U
        assert (den_C > 0).all()  # every user kept has a target and each replicate draws >= 1 user
        reps_BV[s : s + c] = (w_CU @ sums_VU.T) / den_C[:, None]
    return reps_BV


def frequency_buckets(counts_Q: np.ndarray, edges: tuple[int, ...] = (5, 20)) -> tuple[np.ndarray, list[str]]:
    """The bucket of every target by its number of training interactions, and the buckets' labels:
    edges (5, 20) give "0-4", "5-19", "20+". Edges must be positive and strictly increasing."""
    edges = tuple(int(e) for e in edges)
    if any(e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"edges must be positive and strictly increasing, got {edges}")
    counts_Q = np.asarray(counts_Q)
    if counts_Q.size and counts_Q.min() < 0:
        raise ValueError("interaction counts must be non-negative")
    lows = (0, *edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges, strict=False)] + [f"{lows[-1]}+"]
    return np.searchsorted(np.asarray(edges), counts_Q, side="right").astype(np.int64), labels
