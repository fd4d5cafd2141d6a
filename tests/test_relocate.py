"""The relocate collision policy against a slow, literal reference of its rule."""

from __future__ import annotations

import numpy as np
import pytest

from semid_dist.math.dedup import row_groups
from semid_dist.math.relocate import last_level_candidates_np, relocate


def reference(ids, codes, cand, err, occupied=()):
    """The rule as written: stayers, then a sequential greedy per prefix, then suffixes."""
    n, L = codes.shape
    held = {tuple(r) for r in np.asarray(occupied).reshape(-1, L).tolist()}
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(codes[i].tolist()), []).append(i)
    stays = set()
    for t, rows in groups.items():
        if t not in held:
            stays.add(min(rows, key=lambda i: (float(err[i, 0]), int(ids[i]))))
    for i in stays:
        held.add(tuple(codes[i].tolist()))
    movers = [i for i in range(n) if i not in stays]
    pairs = []
    for i in movers:
        for j in range(1, cand.shape[1]):
            pairs.append((float(err[i, j]), int(ids[i]), int(cand[i, j]), i))
    pairs.sort()
    new = codes.copy()
    placed = set()
    for _, _, code, i in pairs:  # prefixes are independent: one global order is the same
        slot = tuple(codes[i, :-1].tolist()) + (code,)
        if i in placed or slot in held:
            continue
        placed.add(i)
        held.add(slot)
        new[i, -1] = code
    dedup = np.zeros(n, np.int64)
    final: dict[tuple, list[int]] = {}
    for i in range(n):
        final.setdefault(tuple(new[i].tolist()), []).append(i)
    for rows in final.values():
        rows.sort(key=lambda i: (i not in stays, int(ids[i])))
        for r, i in enumerate(rows):
            dedup[i] = r
    return new, dedup, placed


def catalog(seed, n=300, d=8, L=2, K=6, k=4, ties=False):
    rng = np.random.default_rng(seed)
    books = rng.normal(size=(L, K, d)).astype(np.float32)
    books[1:] *= 0.5
    x = (rng.normal(size=(n, d)) * 1.2).astype(np.float32)
    from semid_dist.math.nearest_np import residual_encode_np

    codes, _ = residual_encode_np(x, books)
    cand, err = last_level_candidates_np(x, books, codes, k)
    if ties:  # coarse errors: many exact ties, settled by ItemID, then code
        err = np.round(err * 2) / 2
    ids = rng.choice(10 * n, size=n, replace=False).astype(np.int64)
    return ids, codes, cand, err, x, books


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
def test_relocation_matches_the_slow_reference(seed, ties):
    ids, codes, cand, err, *_ = catalog(seed, ties=ties)
    rel = relocate(ids, codes, cand, err)
    new, dedup, placed = reference(ids, codes, cand, err)
    assert row_groups(codes)[1].sum() < len(ids) - 20  # the catalog has collisions to resolve
    np.testing.assert_array_equal(rel.codes_NL, new)
    np.testing.assert_array_equal(rel.dedup_N, dedup)
    assert set(np.flatnonzero(rel.moved_N).tolist()) == placed
    sid = np.concatenate([rel.codes_NL, rel.dedup_N[:, None]], axis=1)
    assert row_groups(sid)[1].all(), "duplicate semantic ID"
    assert (rel.dedup_N[rel.moved_N] == 0).all()
    assert (rel.codes_NL[:, :-1] == codes[:, :-1]).all(), "a mover left its prefix"


def test_each_moved_item_gets_its_best_free_candidate_in_order():
    ids, codes, cand, err, *_ = catalog(5, n=48, K=8, k=8)
    rel = relocate(ids, codes, cand, err)
    assert rel.moved_N.sum() > 5
    held = {tuple(r) for r in rel.codes_NL[~rel.moved_N].tolist()}
    for i in np.flatnonzero(rel.moved_N):
        j = int(np.flatnonzero(cand[i] == rel.codes_NL[i, -1])[0])
        # every better candidate was held by an item that stayed or by a mover placed before it
        for jj in range(1, j):
            slot = tuple(codes[i, :-1].tolist()) + (int(cand[i, jj]),)
            holders = np.flatnonzero((rel.codes_NL == slot).all(axis=1))
            assert holders.size, "a better candidate was left free"
            h = holders[0]
            if rel.moved_N[h]:
                hj = int(np.flatnonzero(cand[h] == slot[-1])[0])
                assert (err[h, hj], ids[h]) <= (err[i, jj], ids[i])
            else:
                assert slot in held
    # the error moved the right way: each mover's new error is its candidate's
    assert rel.err_delta == pytest.approx(
        float(
            sum(
                err[i, int(np.flatnonzero(cand[i] == rel.codes_NL[i, -1])[0])] - err[i, 0]
                for i in np.flatnonzero(rel.moved_N)
            )
        ),
        rel=1e-6,
    )


def test_deterministic_across_row_order_and_prefix_sharding():
    ids, codes, cand, err, *_ = catalog(7, n=400)
    whole = relocate(ids, codes, cand, err)
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = relocate(ids[perm], codes[perm], cand[perm], err[perm])
    np.testing.assert_array_equal(shuffled.codes_NL, whole.codes_NL[perm])
    np.testing.assert_array_equal(shuffled.dedup_N, whole.dedup_N[perm])
    # three workers, each with whole prefix groups (as a groupby on the prefix would give them)
    part = codes[:, 0] % 3
    codes_out = np.empty_like(codes)
    dedup_out = np.empty(len(ids), np.int64)
    for w in range(3):
        rows = np.flatnonzero(part == w)
        r = relocate(ids[rows], codes[rows], cand[rows], err[rows])
        codes_out[rows], dedup_out[rows] = r.codes_NL, r.dedup_N
    np.testing.assert_array_equal(codes_out, whole.codes_NL)
    np.testing.assert_array_equal(dedup_out, whole.dedup_N)


def test_a_full_prefix_falls_back_to_the_suffix():
    # one prefix, 3 last-level codes, 5 items on the same code: two move, two keep a suffix
    ids = np.array([50, 10, 40, 20, 30], np.int64)
    codes = np.array([[0, 1]] * 5, np.int64)
    cand = np.array([[1, 0, 2]] * 5, np.int32)
    err = np.array([[3, 4, 5], [2, 6, 7], [1, 4, 9], [2, 8, 5], [4, 5, 5]], np.float32)
    rel = relocate(ids, codes, cand, err)
    # ItemID 40 (error 1) stays. Pairs by (error, ItemID): (4, 50, code 0) places 50; at error 5,
    # ItemID 20 comes before 30 and takes code 2; 30 and 10 find both codes held: suffixes 2 and 1.
    np.testing.assert_array_equal(rel.codes_NL[:, 1], [0, 1, 1, 2, 1])
    np.testing.assert_array_equal(rel.dedup_N, [0, 1, 0, 0, 2])
    np.testing.assert_array_equal(rel.moved_N, [True, False, False, True, False])
    np.testing.assert_array_equal(rel.suffix_N, [False, True, False, False, True])


def test_occupied_slots_are_never_taken_or_kept():
    ids, codes, cand, err, *_ = catalog(9, n=150)
    occupied = np.unique(codes[::7], axis=0)
    rel = relocate(ids, codes, cand, err, occupied)
    new, dedup, placed = reference(ids, codes, cand, err, occupied)
    np.testing.assert_array_equal(rel.codes_NL, new)
    np.testing.assert_array_equal(rel.dedup_N, dedup)
    occ = {tuple(r) for r in occupied.tolist()}
    on_occ = np.flatnonzero([tuple(r) in occ for r in rel.codes_NL.tolist()])
    assert on_occ.size and not rel.stays_N[on_occ].any() and not rel.moved_N[on_occ].any()
    # an item left on an occupied tuple had no free candidate
    held = {tuple(r) for r in rel.codes_NL.tolist()} | occ
    for i in on_occ:
        assert all(tuple(codes[i, :-1].tolist()) + (int(c),) in held for c in cand[i, 1:])


def test_candidates_match_a_brute_force_reference():
    ids, codes, cand, err, x, books = catalog(11, n=100, K=12, k=5)
    r = x - books[0][codes[:, 0]]
    full = ((r[:, None, :] - books[1][None]) ** 2).sum(-1)
    for i in range(len(x)):
        assert cand[i, 0] == codes[i, 1]
        assert err[i, 0] == pytest.approx(full[i, codes[i, 1]], rel=1e-4, abs=1e-4)
        others = [c for c in np.lexsort((np.arange(12), full[i])) if c != codes[i, 1]][:4]
        np.testing.assert_allclose(err[i, 1:], full[i, others], rtol=1e-4, atol=1e-4)
    # a row's candidates do not depend on its batch
    c1, e1 = last_level_candidates_np(x[:7], books, codes[:7], 5)
    np.testing.assert_array_equal(c1, cand[:7])
    np.testing.assert_array_equal(e1, err[:7])


def test_suffix_dedup_in_one_sort_equals_dedup_codes():
    from semid_dist.math.dedup import dedup_codes, suffix_dedup
    from semid_dist.math.metrics import collision_stats

    rng = np.random.default_rng(2)
    for n in (1, 7, 500):
        ids = np.sort(rng.choice(10 * n, n, replace=False))
        codes = rng.integers(0, 3, (n, 2)).astype(np.uint16)
        dedup, sizes = suffix_dedup(codes)
        np.testing.assert_array_equal(dedup, dedup_codes(ids, codes))
        assert sizes.sum() == n and collision_stats(codes, sizes) == collision_stats(codes)


def test_rows_without_a_collision_all_stay():
    ids, codes, cand, err, *_ = catalog(12, n=40)
    _, first = np.unique(codes, axis=0, return_index=True)  # one row per L-code tuple
    rel = relocate(ids[first], codes[first], cand[first], err[first])
    assert rel.stays_N.all() and not rel.moved_N.any() and not rel.dedup_N.any()
    np.testing.assert_array_equal(rel.codes_NL, codes[first])
    occupied = codes[first][:3]  # ... unless a tuple is held outside: those rows move or suffix
    rel = relocate(ids[first], codes[first], cand[first], err[first], occupied)
    assert (~rel.stays_N).sum() == 3
