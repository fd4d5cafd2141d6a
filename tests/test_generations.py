"""ID assignment across generations (math/generations.py) against a slow, obvious reference."""

import hashlib

import numpy as np
import pytest

from semid_dist.config import CHANGED_POLICIES
from semid_dist.math import generations as gen
from semid_dist.math.dedup import dedup_codes

# --- the slow reference: dicts, sets and loops, straight from the rules in the docstring ------


def reference_assign(prev, retired, ids, fps, codes, tok, seq, policy):
    L = codes.shape[1]
    prev_d = {
        int(i): (int(f), tuple(map(int, s)), int(t))
        for i, f, s, t in zip(prev.ids, prev.fp, prev.sid, prev.tok, strict=True)
    }
    rows = [
        dict(id=int(i), fp=int(f), sid=tuple(map(int, s)), tok=int(t), seq=int(q), reason=int(r))
        for i, f, s, t, q, r in zip(
            retired.ids, retired.fp, retired.sid, retired.tok, retired.seq, retired.reason, strict=True
        )
    ]
    used = {s for _, s, _ in prev_d.values()} | {r["sid"] for r in rows}
    out, status, fresh, taken_back, retire = {}, {}, [], set(), []
    tonight = {int(i): (int(f), tuple(map(int, c))) for i, f, c in zip(ids, fps, codes, strict=True)}
    for i in sorted(tonight):
        fp, c = tonight[i]
        if i in prev_d:
            pfp, psid, ptok = prev_d[i]
            if pfp == fp:
                out[i], status[i] = (psid, ptok), gen.STABLE
                continue
            if policy == "keep_if_same_codes" and ptok == tok and psid[:L] == c:
                out[i], status[i] = (psid, ptok), gen.KEPT
                continue
            retire.append(dict(id=i, fp=pfp, sid=psid, tok=ptok, seq=seq, reason=gen.CHANGED))
        cands = [k for k, r in enumerate(rows) if r["id"] == i and r["fp"] == fp]
        if cands:
            k = min(cands, key=lambda k: (-rows[k]["seq"], rows[k]["sid"]))
            taken_back.add(k)
            out[i], status[i] = (rows[k]["sid"], rows[k]["tok"]), gen.RECLAIMED
        else:
            fresh.append(i)
    for i in fresh:  # ItemID order; the smallest dedup code never issued before
        c, d = tonight[i][1], 0
        while c + (d,) in used:
            d += 1
        used.add(c + (d,))
        out[i], status[i] = (c + (d,), tok), gen.FRESH
    for i in sorted(prev_d):
        if i not in tonight:
            pfp, psid, ptok = prev_d[i]
            retire.append(dict(id=i, fp=pfp, sid=psid, tok=ptok, seq=seq, reason=gen.REMOVED))
    kept_rows = [r for k, r in enumerate(rows) if k not in taken_back] + retire
    return out, status, sorted(kept_rows, key=lambda r: r["sid"])


def as_dicts(a):
    out = {
        int(i): (tuple(map(int, s)), int(t))
        for i, s, t in zip(a.mapping.ids, a.mapping.sid, a.mapping.tok, strict=True)
    }
    status = dict(zip(map(int, a.mapping.ids), map(int, a.status_N), strict=True))
    r = a.retired
    rows = [
        dict(id=int(i), fp=int(f), sid=tuple(map(int, s)), tok=int(t), seq=int(q), reason=int(x))
        for i, f, s, t, q, x in zip(r.ids, r.fp, r.sid, r.tok, r.seq, r.reason, strict=True)
    ]
    return out, status, rows


def simulate(rng, n_gens, L=2, K=3, policy="keep_if_same_codes", check=True):
    """Random nightly histories over a tiny code space (so tuples collide a lot) and a tiny
    fingerprint space (so items change back to an earlier embedding and reclaim old IDs)."""
    prev, retired = gen.IdTable.empty(L + 1), gen.RetiredTable.empty(L + 1)
    issued: dict[tuple, int] = {}  # every ID ever handed out -> the ItemID that got it
    universe = np.arange(100, 160)
    tok = 7
    for seq in range(1, n_gens + 1):
        if rng.random() < 0.3:
            tok += 1  # a retrained tokenizer
        ids = np.sort(rng.choice(universe, size=rng.integers(5, 40), replace=False)).astype(np.int64)
        fps = rng.integers(0, 3, size=ids.size).astype(np.uint64)
        codes = rng.integers(0, K, size=(ids.size, L)).astype(np.int64)
        a = gen.assign(prev, retired, ids, fps, codes, tok, seq, policy)
        if check:
            assert as_dicts(a) == reference_assign(prev, retired, ids, fps, codes, tok, seq, policy)
        for i, s in zip(a.mapping.ids.tolist(), map(tuple, a.mapping.sid.tolist()), strict=True):
            assert issued.setdefault(s, i) == i, f"ID {s} handed to {i}, it was {issued[s]}'s"
        held = {tuple(s) for s in np.concatenate([a.mapping.sid, a.retired.sid]).tolist()}
        assert held == set(issued), "every ID ever issued is live or retired, and nothing else"
        # unchanged items keep their ID exactly
        before = dict(
            zip(
                prev.ids.tolist(),
                zip(prev.fp.tolist(), map(tuple, prev.sid.tolist()), strict=True),
                strict=True,
            )
        )
        for i, f, s in zip(
            a.mapping.ids.tolist(), a.mapping.fp.tolist(), map(tuple, a.mapping.sid.tolist()), strict=True
        ):
            if i in before and before[i][0] == f:
                assert before[i][1] == s
        prev, retired = a.mapping, a.retired
    return prev, retired


@pytest.mark.parametrize("policy", gen.POLICIES)
def test_assign_matches_reference_over_random_histories(policy):
    rng = np.random.default_rng(0)
    for _ in range(25):
        simulate(rng, n_gens=8, policy=policy)


def test_counts_and_statuses():
    prev = gen.IdTable(
        ids=np.array([1, 2, 3, 4, 5]),
        fp=np.array([10, 20, 30, 40, 50], np.uint64),
        sid=np.array([[0, 0, 0], [0, 0, 1], [1, 1, 0], [2, 2, 0], [3, 3, 0]]),
        tok=np.full(5, 9, np.uint64),
    )
    retired = gen.RetiredTable(
        ids=np.array([7, 8]),
        fp=np.array([70, 80], np.uint64),
        sid=np.array([[0, 0, 2], [1, 1, 1]]),
        tok=np.array([9, 9], np.uint64),
        seq=np.array([1, 1]),
        reason=np.array([gen.REMOVED, gen.REMOVED], np.int8),
    )
    ids = np.array([1, 2, 3, 5, 6, 7, 8])
    fps = np.array([10, 21, 31, 50, 60, 70, 81], np.uint64)
    codes = np.array([[5, 5], [0, 0], [2, 2], [4, 4], [0, 0], [9, 9], [1, 1]])
    a = gen.assign(prev, retired, ids, fps, codes, 9, seq=2)
    sid = dict(zip(a.mapping.ids.tolist(), map(tuple, a.mapping.sid.tolist()), strict=True))
    assert sid[1] == (0, 0, 0)  # stable: old ID although tonight's codes differ
    assert sid[2] == (0, 0, 1)  # changed, same codes, same tokenizer: kept
    assert sid[7] == (0, 0, 2)  # back with its old embedding: reclaims its retired ID
    # fresh: 3 (changed, codes moved) and 6, 8 (new); (0,0,*) holds 0, 1 and 2 -> 6 gets 3;
    # (1,1,*) holds 0 (item 3's old ID, retired tonight) and 1 (retired) -> 8 gets 2
    assert sid[3] == (2, 2, 1) and sid[6] == (0, 0, 3) and sid[8] == (1, 1, 2)
    assert list(a.status_N) == [
        gen.STABLE,
        gen.KEPT,
        gen.FRESH,
        gen.STABLE,
        gen.FRESH,
        gen.RECLAIMED,
        gen.FRESH,
    ]
    assert a.counts == {
        "items": 7,
        "stable": 2,
        "new": 3,
        "changed": 2,
        "removed": 1,
        "changed_kept_id": 1,
        "reclaimed": 1,
        "fresh_ids": 3,
        "retired_tonight": 2,
        "retired_total": 3,
        "max_dedup_code": 3,
    }
    retired_now = {
        tuple(s): (int(i), int(r))
        for s, i, r in zip(a.retired.sid.tolist(), a.retired.ids, a.retired.reason, strict=True)
    }
    assert retired_now == {
        (1, 1, 0): (3, gen.CHANGED),
        (2, 2, 0): (4, gen.REMOVED),
        (1, 1, 1): (8, gen.REMOVED),
    }

    b = gen.assign(prev, retired, ids, fps, codes, 9, seq=2, policy="reassign")
    assert dict(zip(b.mapping.ids.tolist(), map(tuple, b.mapping.sid.tolist()), strict=True))[2] != (0, 0, 1)
    c = gen.assign(prev, retired, ids, fps, codes, tok=10, seq=2)  # retrained: no "same codes" shortcut
    sid_c = dict(zip(c.mapping.ids.tolist(), map(tuple, c.mapping.sid.tolist()), strict=True))
    assert sid_c[1] == (0, 0, 0) and sid_c[2] != (0, 0, 1) and sid_c[7] == (0, 0, 2)


def test_first_night_is_plain_dedup():
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(10_000, 3000, replace=False)).astype(np.int64)
    codes = rng.integers(0, 6, size=(3000, 3))
    a = gen.assign(
        gen.IdTable.empty(4), gen.RetiredTable.empty(4), ids, np.arange(3000, dtype=np.uint64), codes, 1, 1
    )
    assert np.array_equal(a.mapping.sid[:, 3], dedup_codes(ids, codes))
    assert a.counts["new"] == a.counts["fresh_ids"] == 3000 and len(a.retired) == 0


def test_fresh_dedup_codes_against_greedy():
    rng = np.random.default_rng(2)
    for _ in range(50):
        L = int(rng.integers(1, 4))
        used = np.unique(np.c_[rng.integers(0, 3, size=(40, L)), rng.integers(0, 8, size=40)], axis=0)
        codes = rng.integers(0, 3, size=(int(rng.integers(0, 30)), L))
        taken = set(map(tuple, used.tolist()))
        want = []
        for c in map(tuple, codes.tolist()):
            d = 0
            while c + (d,) in taken:
                d += 1
            taken.add(c + (d,))
            want.append(d)
        assert gen.fresh_dedup_codes(codes, used).tolist() == want


def test_fingerprints_exact_float32_bytes():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 24)).astype(np.float32)
    fp = gen.embedding_fingerprints(x)
    want = [
        int.from_bytes(hashlib.blake2b(r.astype("<f4").tobytes(), digest_size=8).digest(), "little")
        for r in x
    ]
    assert fp.dtype == np.uint64 and fp.tolist() == want
    assert np.array_equal(gen.embedding_fingerprints(x[37:64]), fp[37:64])  # batching does not matter
    assert np.array_equal(gen.embedding_fingerprints(x.astype(np.float64)), fp)  # float64 in: rounded first
    y = x.copy()
    y[5, 3] = np.nextafter(y[5, 3], np.float32(np.inf))  # one ulp is a change
    assert (gen.embedding_fingerprints(y) != fp).tolist() == [i == 5 for i in range(100)]
    assert gen.embedding_fingerprints(np.zeros((0, 8), np.float32)).shape == (0,)


def test_policy_names_agree_with_config_and_are_checked():
    assert tuple(CHANGED_POLICIES) == gen.POLICIES
    with pytest.raises(ValueError, match="policy"):
        gen.assign(
            gen.IdTable.empty(2),
            gen.RetiredTable.empty(2),
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros((0, 1), np.int64),
            1,
            1,
            policy="whatever",
        )


def _relocate_night(rng, n, L=2, K=6, k=4):
    """Random codes and candidates (own code first, errors ascending) for n items."""
    codes = rng.integers(0, K, size=(n, L)).astype(np.int64)
    others = np.argsort(rng.random((n, K)), axis=1)
    cand = np.empty((n, k), np.int64)
    cand[:, 0] = codes[:, -1]
    for i in range(n):
        cand[i, 1:] = [c for c in others[i] if c != codes[i, -1]][: k - 1]
    err = np.sort(rng.random((n, k)).astype(np.float32), axis=1)
    return codes, cand, err


def test_relocate_lineage_first_night_equals_train_and_later_nights_keep_ids():
    from semid_dist.math.relocate import relocate

    rng = np.random.default_rng(3)
    n, L = 40, 2
    ids = np.arange(100, 100 + n, dtype=np.int64)
    fps = rng.integers(0, 2**63, n).astype(np.uint64)
    codes, cand, err = _relocate_night(rng, n, L)
    empty = gen.IdTable.empty(L + 1), gen.RetiredTable.empty(L + 1)
    a1 = gen.assign(*empty, ids, fps, codes, 1, 1, "keep_if_same_codes", cand, err)
    rel = relocate(ids, codes, cand, err)
    np.testing.assert_array_equal(a1.mapping.sid[:, :L], rel.codes_NL)  # night 1 == semid train
    np.testing.assert_array_equal(a1.mapping.sid[:, L], rel.dedup_N)
    assert (a1.mapping.sid[:, :L] != codes).any(axis=1).sum() > 5  # items were moved

    # night 2: 10 removed, 10 changed (new fingerprints, same raw codes), 25 new items
    keep = np.ones(n, bool)
    keep[:10] = False
    ids2 = np.concatenate([ids[keep], np.arange(1000, 1025)])
    fps2 = np.concatenate([fps[keep], rng.integers(0, 2**63, 25).astype(np.uint64)])
    fps2[:10] ^= np.uint64(1)  # changed
    c_new, cand_new, err_new = _relocate_night(rng, 25, L)
    codes2 = np.concatenate([codes[keep], c_new])
    cand2 = np.concatenate([cand[keep], cand_new])
    err2 = np.concatenate([err[keep], err_new])
    a2 = gen.assign(a1.mapping, a1.retired, ids2, fps2, codes2, 1, 2, "keep_if_same_codes", cand2, err2)
    prev = {int(i): tuple(s) for i, s in zip(a1.mapping.ids, a1.mapping.sid.tolist(), strict=True)}
    now = {int(i): tuple(s) for i, s in zip(a2.mapping.ids, a2.mapping.sid.tolist(), strict=True)}
    stable = ids[keep][10:]
    assert all(now[int(i)] == prev[int(i)] for i in stable), "a kept ID moved"
    # keep_if_same_codes compares the codes after the policy: a changed item keeps its ID exactly
    # when whole-catalog relocation tonight puts it on its ID's codes
    after = relocate(ids2, codes2, cand2, err2).codes_NL
    for r, i in enumerate(ids[keep][:10]):
        same = tuple(after[r].tolist()) == prev[int(i)][:L]
        assert (now[int(i)] == prev[int(i)]) == same
    # new items never take a live or a retired ID (assign asserts that), and a new item takes a
    # dedup code only when all its candidate slots are held
    held = {s[:L] for s in now.values()} | {tuple(s[:L]) for s in a2.retired.sid.tolist()}
    for r in range(n - 10, len(ids2)):
        sid = now[int(ids2[r])]
        if sid[L] > 0:
            assert all((*codes2[r, :-1].tolist(), int(c)) in held for c in cand2[r, 1:])
    assert a2.counts["fresh_ids"] >= 25
    assert 0 < a2.counts["changed_kept_id"] < 10, a2.counts  # both sides of the rule were exercised


def _relocated(ids, fps, codes, cand, err, prev):
    """What the nightly job hands assign: the whole relocation done elsewhere, and candidates
    only for the rows that are not stable against prev (none on a first night)."""
    from semid_dist.math.relocate import relocate

    rel = relocate(ids, codes, cand, err)
    pos = np.minimum(np.searchsorted(prev.ids, ids), max(len(prev) - 1, 0))
    stable = (prev.ids[pos] == ids) & (prev.fp[pos] == fps) if len(prev) else np.zeros(len(ids), bool)
    rows = np.flatnonzero(~stable) if len(prev) else np.zeros(0, np.int64)
    return gen.Relocated(rel.codes_NL, rel.dedup_N, rows, cand[rows], err[rows])


@pytest.mark.parametrize("policy", gen.POLICIES)
def test_relocation_done_elsewhere_gives_the_same_ids_over_three_nights(policy):
    rng = np.random.default_rng(8)
    n, L = 300, 2
    ids = np.arange(n, dtype=np.int64) * 3
    fps = rng.integers(0, 2**63, n).astype(np.uint64)
    codes, cand, err = _relocate_night(rng, n, L, K=8, k=3)
    prev, retired = gen.IdTable.empty(L + 1), gen.RetiredTable.empty(L + 1)
    for night in range(1, 4):
        full = gen.assign(prev, retired, ids, fps, codes, 1, night, policy, cand, err)
        here = gen.assign(
            prev,
            retired,
            ids,
            fps,
            codes,
            1,
            night,
            policy,
            relocated=_relocated(ids, fps, codes, cand, err, prev),
        )
        np.testing.assert_array_equal(here.mapping.sid, full.mapping.sid)
        np.testing.assert_array_equal(here.retired.sid, full.retired.sid)
        assert here.counts == full.counts
        assert night == 1 or full.counts["fresh_ids"] > 20
        prev, retired = full.mapping, full.retired
        # tomorrow: 20 removed, 20 changed (another embedding and other codes), 30 new items
        keep = np.ones(len(ids), bool)
        keep[rng.choice(len(ids), 20, replace=False)] = False
        c_new, cand_new, err_new = _relocate_night(rng, 50, L, K=8, k=3)
        ids = np.concatenate([ids[keep], ids.max() + 1 + np.arange(30)])
        order = np.argsort(ids)
        fps = np.concatenate([fps[keep], rng.integers(0, 2**63, 30).astype(np.uint64)])
        codes = np.concatenate([codes[keep], c_new[:30]])
        cand = np.concatenate([cand[keep], cand_new[:30]])
        err = np.concatenate([err[keep], err_new[:30]])
        changed = rng.choice(len(ids) - 30, 20, replace=False)
        fps[changed] ^= np.uint64(1)
        codes[changed], cand[changed], err[changed] = c_new[30:], cand_new[30:], err_new[30:]
        ids, fps, codes, cand, err = ids[order], fps[order], codes[order], cand[order], err[order]
