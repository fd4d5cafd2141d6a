"""Retrieval metrics, paired bootstrap intervals and constrained beam search, against
hand-computed cases and slow, obvious Python references (no Ray)."""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest
import torch

from semid_dist.math.prefix_beam import PrefixTree, beam_search
from semid_dist.math.retrieval import (
    frequency_buckets,
    hit_ranks,
    ndcg_at,
    paired_bootstrap,
    per_user,
    recall_at,
    user_sums,
)

# ---- metrics ----


def test_ranks_recall_and_ndcg_by_hand():
    recs_QK = np.array([[3, 7, 1], [2, -1, -1], [5, 6, 9], [8, 4, -1]])
    target_Q = np.array([1, 2, 4, 4])
    rank_Q = hit_ranks(recs_QK, target_Q)
    assert rank_Q.tolist() == [3, 1, 0, 2] and rank_Q.dtype == np.int64
    assert recall_at(rank_Q, 1).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert recall_at(rank_Q, 3).tolist() == [1.0, 1.0, 0.0, 1.0]
    np.testing.assert_allclose(ndcg_at(rank_Q, 3), [0.5, 1.0, 0.0, 1 / math.log2(3)])
    np.testing.assert_allclose(ndcg_at(rank_Q, 2), [0.0, 1.0, 0.0, 1 / math.log2(3)])
    with pytest.raises(ValueError):
        recall_at(rank_Q, 0)


def test_padding_never_counts_as_a_hit():
    recs_QK = np.array([[-1, -1], [0, -1]])
    assert hit_ranks(recs_QK, np.array([-1, -1])).tolist() == [0, 0]
    assert hit_ranks(np.zeros((2, 0), np.int64), np.array([0, 1])).tolist() == [0, 0]


def test_per_user_sums_and_counts():
    sum_U, count_U = per_user(np.array([1.0, 0.0, 1.0, 0.5]), np.array([0, 2, 2, 0]), 4)
    assert sum_U.tolist() == [1.5, 0.0, 1.0, 0.0] and count_U.tolist() == [2, 0, 2, 0]
    with pytest.raises(ValueError):
        per_user(np.ones(2), np.array([0, 4]), 4)


def test_frequency_buckets_boundaries():
    bucket_Q, labels = frequency_buckets(np.array([0, 4, 5, 19, 20, 1000]))
    assert labels == ["0-4", "5-19", "20+"]
    assert bucket_Q.tolist() == [0, 0, 1, 1, 2, 2]
    assert frequency_buckets(np.array([0, 1, 3]), edges=(1, 2, 3))[1] == ["0-0", "1-1", "2-2", "3+"]
    with pytest.raises(ValueError):
        frequency_buckets(np.array([1]), edges=(20, 5))


# ---- paired bootstrap ----


def _targets(n_users: int, n_targets: int, seed: int):
    """Per-target hit values of two variants (B a little worse than A) and their users."""
    rng = np.random.default_rng(seed)
    user_Q = rng.integers(0, n_users, n_targets)
    a_Q = (rng.random(n_targets) < 0.3).astype(np.float64)
    b_Q = a_Q * (rng.random(n_targets) < 0.8)
    return np.stack([a_Q, b_Q]), user_Q


def test_bootstrap_point_is_the_micro_average_and_inside_its_interval():
    values_VQ, user_Q = _targets(300, 2000, 0)
    boot = paired_bootstrap(*user_sums(values_VQ, user_Q, 300), n_boot=500, seed=1)
    np.testing.assert_allclose(boot.point_V, values_VQ.mean(axis=1))
    assert boot.reps_BV.shape == (500, 2) and boot.reps_BV.dtype == np.float64
    assert (boot.lo_V < boot.point_V).all() and (boot.point_V < boot.hi_V).all()
    point, lo, hi = boot.diff(0, 1)
    assert point == pytest.approx(boot.point_V[0] - boot.point_V[1]) and 0 < lo < point < hi


def test_bootstrap_paired_differences():
    values_VQ, user_Q = _targets(200, 1000, 2)
    shifted_VQ = np.stack([values_VQ[0], values_VQ[0] + 0.25, values_VQ[1]])
    boot = paired_bootstrap(*user_sums(shifted_VQ, user_Q, 200), n_boot=300)
    assert boot.diff(2, 2) == (0.0, 0.0, 0.0)
    point, lo, hi = boot.diff(1, 0)  # the same constant on every target: no sampling noise left
    assert point == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_bootstrap_is_deterministic_per_seed():
    sums_VU, counts_U = user_sums(*_targets(100, 400, 3), 100)
    one, two = (
        paired_bootstrap(sums_VU, counts_U, 200, seed=7),
        paired_bootstrap(sums_VU, counts_U, 200, seed=7),
    )
    assert np.array_equal(one.reps_BV, two.reps_BV) and np.array_equal(one.lo_V, two.lo_V)
    assert not np.array_equal(one.reps_BV, paired_bootstrap(sums_VU, counts_U, 200, seed=8).reps_BV)


def test_bootstrap_of_a_bucket_resamples_only_users_with_targets():
    values_VQ, user_Q = _targets(500, 600, 4)
    bucket_Q = np.random.default_rng(5).integers(0, 3, 600)
    sums_VU, counts_U = user_sums(values_VQ, user_Q, 500, mask_Q=bucket_Q == 2)
    assert (counts_U == 0).any()  # many users have no target in this bucket
    boot = paired_bootstrap(sums_VU, counts_U, n_boot=300, seed=3)
    assert np.isfinite(boot.reps_BV).all()
    np.testing.assert_allclose(boot.point_V, values_VQ[:, bucket_Q == 2].mean(axis=1))
    has = counts_U > 0  # the users without targets are dropped: the same draws without them
    same = paired_bootstrap(sums_VU[:, has], counts_U[has], n_boot=300, seed=3)
    assert np.array_equal(boot.reps_BV, same.reps_BV)
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros((1, 3)), np.zeros(3, np.int64))


def test_bootstrap_over_many_users_is_chunked():
    n_users, n_boot = 200_000, 200  # a (B, U) int64 matrix of multiplicities would be 320 MB
    rng = np.random.default_rng(6)
    counts_U = rng.integers(0, 4, n_users)
    sums_VU = np.stack([rng.binomial(counts_U, 0.3), rng.binomial(counts_U, 0.2)]).astype(np.float64)
    tracemalloc.start()
    t0 = time.perf_counter()
    boot = paired_bootstrap(sums_VU, counts_U, n_boot=n_boot)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"
    assert seconds < 10
    assert (boot.lo_V <= boot.point_V).all() and (boot.point_V <= boot.hi_V).all()


# ---- constrained beam search ----

HASH = 97


def _catalog(vocab: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """n distinct random IDs over the given per-level vocabularies, each level's largest code used."""
    rng = np.random.default_rng(seed)
    while True:
        flat = rng.choice(math.prod(vocab), size=n, replace=False)
        sid_NM = np.stack(np.unravel_index(flat, vocab), axis=1).astype(np.int64)
        if all(sid_NM[:, d].max() == v - 1 for d, v in enumerate(vocab)):
            return sid_NM


def _tables(vocab, n_queries: int, seed: int, kind: str = "random") -> list[torch.Tensor]:
    """Per depth, (Q, HASH, V_d) float32 log-probabilities: query q after a prefix hashing to h.
    kind "zero": all equal; "coarse": rounded to halves, so that many candidates tie."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for v in vocab:
        logits = (
            torch.zeros(n_queries, HASH, v)
            if kind == "zero"
            else 3 * torch.randn(n_queries, HASH, v, generator=g)
        )
        logp = torch.log_softmax(logits, dim=-1)
        out.append(torch.round(logp * 2) / 2 if kind == "coarse" else logp)
    return out


def _hash(prefix: tuple[int, ...]) -> int:
    return sum((c + 1) * 31**i for i, c in enumerate(prefix)) % HASH


def _logprob_fn(tables, seen: list):
    """The model: a table lookup by (query, hash of the prefix); checks the inputs it is given."""

    def fn(d: int, prefix_QBd: torch.Tensor) -> torch.Tensor:
        q, b, dd = prefix_QBd.shape
        assert prefix_QBd.dtype == torch.long and dd == d and q == tables[d].shape[0]
        assert d > 0 or b == 1
        for j in range(d):
            assert 0 <= int(prefix_QBd[..., j].min()) and int(prefix_QBd[..., j].max()) < tables[j].shape[2]
        seen.append((d, b))
        pow_d = torch.tensor([31**i for i in range(d)], dtype=torch.long)
        h_QB = ((prefix_QBd + 1) * pow_d).sum(-1) % HASH
        return tables[d][torch.arange(q)[:, None], h_QB]

    return fn


def _lp(tables, q: int, prefix: tuple[int, ...]) -> list[float]:
    return [float(x) for x in tables[len(prefix)][q, _hash(prefix)]]


def _reference(sid_NM, tables, q: int, beam: int, top_k: int, excluded=frozenset()):
    """Beam search in plain Python for one query: the top_k (item, score) pairs."""
    m = sid_NM.shape[1]
    item_of = {tuple(r): i for i, r in enumerate(sid_NM.tolist())}
    valid = [{tuple(r[: d + 1]) for r in sid_NM.tolist()} for d in range(m)]
    beams = [((), 0.0)]
    for d in range(m):
        cands = []
        for prefix, score in beams:
            lp = _lp(tables, q, prefix)
            for c in range(len(lp)):
                if prefix + (c,) in valid[d]:
                    cands.append((prefix + (c,), score + lp[c]))
        if d < m - 1:
            beams = sorted(cands, key=lambda t: (-t[1], t[0]))[:beam]
    leaves = [(item_of[p], s) for p, s in cands if item_of[p] not in excluded]
    return sorted(leaves, key=lambda t: (-t[1], t[0]))[:top_k]


def _exhaustive(sid_NM, tables, q: int, top_k: int, excluded=frozenset()):
    """Every item's total log-probability along its own ID: the exact top_k."""
    scored = []
    for i, row in enumerate(sid_NM.tolist()):
        if i not in excluded:
            score = 0.0
            for d, c in enumerate(row):
                score += _lp(tables, q, tuple(row[:d]))[c]
            scored.append((i, score))
    return sorted(scored, key=lambda t: (-t[1], t[0]))[:top_k]


def _check(items_QK, scores_QK, want_per_query, top_k):
    for q, want in enumerate(want_per_query):
        pad = top_k - len(want)
        assert items_QK[q].tolist() == [i for i, _ in want] + [-1] * pad, q
        np.testing.assert_allclose(scores_QK[q, : len(want)], [s for _, s in want], rtol=0, atol=1e-12)
        assert np.isneginf(scores_QK[q, len(want) :]).all()


def test_prefix_tree_csr_walks_back_to_every_id():
    sid_NM = _catalog((3, 4, 3), 20, 0)
    tree = PrefixTree.build(sid_NM)
    assert tree.depth == 3 and tree.vocab_sizes == [3, 4, 3] and tree.n_items == 20
    paths = [(int(c),) for c in tree.code_P[0]]
    for d in range(1, 3):
        off = tree.child_offsets_P1[d - 1]
        paths = [
            paths[p] + (int(tree.code_P[d][j]),) for p in range(len(paths)) for j in range(off[p], off[p + 1])
        ]
    assert paths == sorted(paths)
    assert paths == [tuple(sid_NM[i]) for i in tree.leaf_item_N.tolist()]
    with pytest.raises(ValueError):
        PrefixTree.build(np.concatenate([sid_NM, sid_NM[3:4]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["random", "zero", "coarse"])  # zero, coarse: the tie rules decide
def test_wide_beam_is_exact_and_narrow_beams_match_the_reference(seed, kind):
    vocab, n_queries = (3, 4, 3), 5
    sid_NM = _catalog(vocab, 20, seed)
    tables, tree = _tables(vocab, n_queries, seed, kind), PrefixTree.build(sid_NM)
    seen = []
    items_QK, scores_QK = beam_search(tree, _logprob_fn(tables, seen), n_queries, beam_size=20, top_k=7)
    _check(items_QK, scores_QK, [_exhaustive(sid_NM, tables, q, 7) for q in range(n_queries)], 7)
    assert [d for d, _ in seen] == [0, 1, 2] and seen[0][1] == 1
    for beam, top_k in [(1, 1), (2, 1), (3, 2), (5, 5), (8, 3)]:
        items_QK, scores_QK = beam_search(tree, _logprob_fn(tables, []), n_queries, beam, top_k)
        want = [_reference(sid_NM, tables, q, beam, top_k) for q in range(n_queries)]
        _check(items_QK, scores_QK, want, top_k)


@pytest.mark.parametrize("kind", ["random", "coarse"])
def test_many_children_per_beam_match_the_reference(kind):
    """Far more candidates than kept (the search first drops those below each query's k-th best)."""
    vocab, n_queries = (4, 9, 8), 3
    sid_NM = _catalog(vocab, 150, 5)
    tables, tree = _tables(vocab, n_queries, 5, kind), PrefixTree.build(sid_NM)
    for beam, top_k in [(1, 1), (2, 2), (3, 1)]:
        items_QK, scores_QK = beam_search(tree, _logprob_fn(tables, []), n_queries, beam, top_k)
        _check(
            items_QK, scores_QK, [_reference(sid_NM, tables, q, beam, top_k) for q in range(n_queries)], top_k
        )


def test_mass_on_invalid_codes_still_returns_valid_ids():
    vocab, n_queries = (4, 4, 4), 3
    sid_NM = _catalog(vocab, 12, 3)  # 12 of 64 IDs: most codes are invalid after most prefixes
    tree = PrefixTree.build(sid_NM)
    valid = [{tuple(r[: d + 1]) for r in sid_NM.tolist()} for d in range(3)]

    def invalid_first(d, prefix_QBd):  # log-prob -0.01 on every invalid code, -20 on valid ones
        q, b, _ = prefix_QBd.shape
        out = torch.full((q, b, 4), -0.01)
        for qi in range(q):
            for bi in range(b):
                p = tuple(prefix_QBd[qi, bi].tolist())
                for c in range(4):
                    if p + (c,) in valid[d]:
                        out[qi, bi, c] = -20.0
        return out

    items_QK, scores_QK = beam_search(tree, invalid_first, n_queries, beam_size=2, top_k=2)
    assert (items_QK >= 0).all()
    np.testing.assert_allclose(scores_QK, -60.0, rtol=1e-6)  # every code on the path was a valid one


def test_exclusions_remove_exactly_their_items():
    vocab, n_queries = (3, 4, 3), 4
    sid_NM = _catalog(vocab, 20, 4)
    tables, tree = _tables(vocab, n_queries, 4), PrefixTree.build(sid_NM)
    rng = np.random.default_rng(4)
    excluded = [set(rng.choice(20, 5, replace=False).tolist()), set(range(20)), set(), set(range(17))]
    offsets_Q1 = np.cumsum([0] + [len(e) for e in excluded])
    items = np.array([i for e in excluded for i in sorted(e)], np.int64)
    for beam, top_k in [(20, 6), (2, 2), (4, 3)]:
        items_QK, scores_QK = beam_search(
            tree, _logprob_fn(tables, []), n_queries, beam, top_k, offsets_Q1, items
        )
        want = [_reference(sid_NM, tables, q, beam, top_k, frozenset(excluded[q])) for q in range(n_queries)]
        _check(items_QK, scores_QK, want, top_k)
        assert (items_QK[1] == -1).all() and np.isneginf(scores_QK[1]).all()  # everything excluded
        assert not set(items_QK[0].tolist()) & excluded[0]
    exact = [_exhaustive(sid_NM, tables, q, 6, frozenset(excluded[q])) for q in range(n_queries)]
    _check(*beam_search(tree, _logprob_fn(tables, []), n_queries, 20, 6, offsets_Q1, items), exact, 6)


def test_one_token_per_item():
    sid_N1 = np.array([[5], [2], [9], [0], [7]])
    tree = PrefixTree.build(sid_N1)
    logp_QV = torch.log_softmax(torch.randn(3, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    items_QK, scores_QK = beam_search(tree, lambda d, p: logp_QV[:, None, :], 3, beam_size=4, top_k=4)
    for q in range(3):
        want = sorted(range(5), key=lambda i: (-float(logp_QV[q, sid_N1[i, 0]]), i))[:4]
        assert items_QK[q].tolist() == want
    ties, _ = beam_search(tree, lambda d, p: torch.zeros(2, 1, 10), 2, beam_size=5, top_k=5)
    assert ties.tolist() == [[0, 1, 2, 3, 4]] * 2  # equal scores: lower item row first


def test_one_token_per_item_over_a_large_vocabulary():
    sid_N1 = np.random.default_rng(7).permutation(1000)[:300, None]
    tree = PrefixTree.build(sid_N1)
    logits_QV = torch.randn(4, 1000, generator=torch.Generator().manual_seed(7))
    logp_QV = torch.round(torch.log_softmax(logits_QV, dim=-1) * 4) / 4  # coarse: ties at the cut
    items_QK, _ = beam_search(tree, lambda d, p: logp_QV[:, None, :], 4, beam_size=6, top_k=6)
    for q in range(4):
        want = sorted(range(300), key=lambda i: (-float(logp_QV[q, sid_N1[i, 0]]), i))[:6]
        assert items_QK[q].tolist() == want


def test_bad_arguments():
    tree = PrefixTree.build(np.array([[0, 1], [1, 0]]))
    fn = _logprob_fn(_tables((2, 2), 1, 0), [])
    for beam, top_k in [(0, 1), (2, 0), (2, 3)]:
        with pytest.raises(ValueError):
            beam_search(tree, fn, 1, beam, top_k)
    with pytest.raises(ValueError):
        beam_search(tree, lambda d, p: torch.zeros(1, 1, 1), 1, 2, 1)  # fewer log-probs than codes
    with pytest.raises(ValueError):
        beam_search(tree, fn, 1, 2, 1, np.array([0, 1]), np.array([2]))  # no item row 2
