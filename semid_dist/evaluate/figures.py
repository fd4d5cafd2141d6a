"""From the test targets' ranks to the published figures (numpy only; no Ray, no I/O).

Per protocol and variant: Recall@5/10 and NDCG@5/10 over every test target, each user's
figures first averaged over the seeds; a 95% bootstrap interval over users, paired (the same
resampled users for every variant, so the difference of two variants has its own interval);
Recall@10 by the target's number of training interactions (cold items).
"""

from __future__ import annotations

import numpy as np

from semid_dist.evaluate.steps import TOP_K, Queries
from semid_dist.math.retrieval import (
    frequency_buckets,
    hit_ranks,
    ndcg_at,
    paired_bootstrap,
    per_user,
    recall_at,
)

METRICS = {
    "recall@5": lambda r: recall_at(r, 5),
    "recall@10": lambda r: recall_at(r, 10),
    "ndcg@5": lambda r: ndcg_at(r, 5),
    "ndcg@10": lambda r: ndcg_at(r, 10),
}
DIFF_METRICS = ("recall@10", "ndcg@10")


def popularity_ranks(counts_N: np.ndarray, q: Queries, keep_seen: bool, top_k: int = TOP_K) -> np.ndarray:
    """The rank of each target among the most-interacted items (ties: lower item row first),
    the user's seen items skipped unless keep_seen."""
    n = len(counts_N)
    order = np.lexsort((np.arange(n), -counts_N))
    recs = np.full((len(q.target_Q), top_k), -1, np.int64)
    seen_n = np.diff(q.seen_offsets_Q1)
    for lo in range(0, len(q.target_Q), 1024):
        rows = np.arange(lo, min(lo + 1024, len(q.target_Q)))
        width = min(n, top_k + (0 if keep_seen else int(seen_n[rows].max(initial=0))))
        cand = np.broadcast_to(order[:width], (len(rows), width))
        keep = np.ones(cand.shape, bool)
        if not keep_seen:  # a candidate the user has seen: key (row, item) among the seen keys
            part = q.take(rows)
            seen_keys = np.repeat(np.arange(len(rows)), np.diff(part.seen_offsets_Q1)) * n + part.seen_items
            keep = ~np.isin(np.arange(len(rows))[:, None] * n + cand, seen_keys)
        first = np.argsort(~keep, axis=1, kind="stable")[:, :top_k]  # kept ones, in popularity order
        got = np.take_along_axis(cand, first, axis=1)
        got[np.arange(got.shape[1])[None, :] >= keep.sum(axis=1)[:, None]] = -1
        recs[rows, : got.shape[1]] = got
    return hit_ranks(recs, q.target_Q)


def protocol_figures(
    names: list[str],
    ranks: dict[str, list[np.ndarray]],
    user_Q: np.ndarray,
    n_users: int,
    target_counts_Q: np.ndarray,
    compare: list[tuple[str, str]],
    n_boot: int,
    seed: int,
) -> dict:
    """ranks: per variant, one rank array per seed (over the same targets)."""
    out: dict = {"targets": int(len(user_Q)), "users": int(len(np.unique(user_Q))), "variants": {}}
    boots = {}
    for metric, fn in METRICS.items():
        sums_VU = np.stack([_user_sums(fn, ranks[v], user_Q, n_users)[0] for v in names])
        counts_U = np.bincount(user_Q, minlength=n_users)
        b = paired_bootstrap(sums_VU, counts_U, n_boot=n_boot, seed=seed)
        boots[metric] = b
        for i, v in enumerate(names):
            per_seed = [float(fn(r).mean()) if len(r) else 0.0 for r in ranks[v]]
            out["variants"].setdefault(v, {})[metric] = {
                "value": float(b.point_V[i]),
                "ci95": [float(b.lo_V[i]), float(b.hi_V[i])],
                "per_seed": per_seed,
            }
    out["differences"] = [
        {
            "a": a,
            "b": bb,
            "metric": m,
            **dict(zip(("diff", "lo", "hi"), boots[m].diff(names.index(a), names.index(bb)), strict=True)),
        }
        for m in DIFF_METRICS
        for a, bb in compare
    ]
    out["cold"] = cold_figures(names, ranks, user_Q, n_users, target_counts_Q, n_boot, seed)
    return out


def cold_figures(names, ranks, user_Q, n_users, target_counts_Q, n_boot: int, seed: int) -> list[dict]:
    """Recall@10 by the target item's number of training interactions, with intervals."""
    bucket_Q, labels = frequency_buckets(target_counts_Q)
    rows = []
    for b, label in enumerate(labels):
        mask = bucket_Q == b
        if not mask.any():
            rows.append({"bucket": label, "targets": 0})
            continue
        sums_VU = np.stack(
            [
                _user_sums(METRICS["recall@10"], [r[mask] for r in ranks[v]], user_Q[mask], n_users)[0]
                for v in names
            ]
        )
        counts_U = np.bincount(user_Q[mask], minlength=n_users)
        bs = paired_bootstrap(sums_VU, counts_U, n_boot=n_boot, seed=seed)
        rows.append(
            {
                "bucket": label,
                "targets": int(mask.sum()),
                "recall@10": {
                    v: {"value": float(bs.point_V[i]), "ci95": [float(bs.lo_V[i]), float(bs.hi_V[i])]}
                    for i, v in enumerate(names)
                },
            }
        )
    return rows


def _user_sums(fn, seed_ranks: list[np.ndarray], user_Q: np.ndarray, n_users: int):
    """Per-user sums of a metric, each target's value averaged over the seeds first."""
    values_Q = np.mean([fn(r) for r in seed_ranks], axis=0) if seed_ranks else np.zeros(len(user_Q))
    return per_user(values_Q, user_Q, n_users)


def comparisons(names: list[str], kinds: dict[str, str]) -> list[tuple[str, str]]:
    """Which paired differences are reported: every run against every baseline, and every run
    against the first run."""
    runs = [v for v in names if kinds[v] == "run"]
    base = [v for v in names if kinds[v] != "run"]
    pairs = [(r, b) for r in runs for b in base]
    pairs += [(r, runs[0]) for r in runs[1:]]
    return pairs
