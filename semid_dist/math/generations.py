"""Stable semantic IDs across nightly generations: the ID-assignment rules, as pure array math.

Given the previous generation (ItemID, embedding fingerprint, semantic ID, tokenizer that made
the ID), the cumulative list of retired IDs, and tonight's catalog (ItemID, fingerprint, codes
from tonight's tokenizer), decide tonight's semantic ID of every item. The rules, in order:

1. **stable** - the item was in the previous generation and its fingerprint is unchanged:
   it keeps its ID exactly, even when tonight's tokenizer was retrained (downstream models
   learned that ID; its codes may now come from an older codebook, which ``tok`` records).
2. **kept** (policy ``keep_if_same_codes`` only) - the fingerprint changed, but the ID was made
   by tonight's tokenizer and tonight's codes equal the ID's first L codes: the ID still says
   the same thing about the item, so it stays. (This absorbs re-embedding noise that does not
   move an item across a code boundary.) Under ``reassign`` a changed item always moves on.
3. **reclaimed** - otherwise, an ID once retired from this very ItemID with this very
   fingerprint is given back (an item dropped from the catalog for a few nights and back
   unchanged keeps its old ID). The most recently retired such ID wins; ties: smallest ID.
4. **fresh** - otherwise a new ID: tonight's L codes plus a dedup code that is the smallest
   integer making an ID never issued before (not live in the previous generation, not
   retired). Fresh items are served in ItemID order, so the result is deterministic; with no
   history it equals ``math.dedup.dedup_codes``.

Under the collision policy ``relocate`` (math/relocate.py; a lineage keeps the policy of its
first night), two things change, and nothing else: in rule 2, "tonight's codes" are the codes
after the policy, i.e. where relocation over the whole of tonight's catalog puts the item (as
a first night would); in rule 4, the fresh items are relocated among themselves, with every
L-code tuple of an ID ever issued (live or retired) held: a fresh item keeps its codes only if
no such ID has them and it is the nearest fresh item on them, otherwise it moves to a free
candidate, and only an item with no free candidate takes a dedup code (the smallest free one,
the item that kept the codes served first). With no history this equals ``semid train``'s
relocation.

IDs of removed items, and old IDs of changed items that did not keep them, are **retired**:
they are appended to the retired list and never handed to another item (downstream models may
still hold them). The invariant that makes rule 4 safe: every ID ever issued is either live in
the previous generation or in the retired list.

"Changed" means: the float32 bytes of the embedding differ (``embedding_fingerprints``), i.e. an
exact comparison, no tolerance. A tolerance would need the old embeddings (N x D) instead of 8
bytes per item, and is not transitive; the ``keep_if_same_codes`` policy is the tolerance that
matters for IDs: small changes that do not change the codes do not change the ID.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from semid_dist.math.dedup import lex_order, row_groups
from semid_dist.math.relocate import relocate

STABLE, KEPT, RECLAIMED, FRESH = 0, 1, 2, 3
REMOVED, CHANGED = 1, 2  # why an ID was retired
REASON_NAMES = {REMOVED: "removed", CHANGED: "changed"}
POLICIES = ("keep_if_same_codes", "reassign")


def embedding_fingerprints(x_ND: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint per row: BLAKE2b of the row's little-endian float32 bytes.

    Exact: any changed bit (including 0.0 vs -0.0) is a change. Inputs in float64 are first
    rounded to float32, the precision the tokenizer sees. Independent of batching and row order.
    """
    x = np.ascontiguousarray(x_ND, dtype="<f4")
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, np.uint64)
    row_bytes = x.shape[1] * 4
    buf = memoryview(x).cast("B")
    digests = b"".join(
        hashlib.blake2b(buf[i * row_bytes : (i + 1) * row_bytes], digest_size=8).digest() for i in range(n)
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


@dataclass
class IdTable:
    """A generation's mapping, one row per item, sorted by ItemID."""

    ids: np.ndarray  # int64 (n,)
    fp: np.ndarray  # uint64 (n,) embedding fingerprint
    sid: np.ndarray  # int64 (n, L+1) semantic ID: L codes + dedup code
    tok: np.ndarray  # uint64 (n,) fingerprint of the tokenizer whose codes the ID carries

    @classmethod
    def empty(cls, width: int) -> "IdTable":
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros((0, width), np.int64),
            np.zeros(0, np.uint64),
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class RetiredTable:
    """Every ID ever retired (and not reclaimed), sorted by semantic ID (unique)."""

    ids: np.ndarray  # int64: the ItemID that held it
    fp: np.ndarray  # uint64: that item's fingerprint when the ID was retired
    sid: np.ndarray  # int64 (r, L+1)
    tok: np.ndarray  # uint64
    seq: np.ndarray  # int64: sequence number of the generation that retired it
    reason: np.ndarray  # int8: REMOVED or CHANGED

    @classmethod
    def empty(cls, width: int) -> "RetiredTable":
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.uint64),
            np.zeros((0, width), np.int64),
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int8),
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: np.ndarray) -> "RetiredTable":
        return RetiredTable(
            self.ids[idx], self.fp[idx], self.sid[idx], self.tok[idx], self.seq[idx], self.reason[idx]
        )


@dataclass
class Assignment:
    mapping: IdTable  # tonight's generation
    retired: RetiredTable  # cumulative, after tonight
    status_N: np.ndarray  # int8 per tonight's item: STABLE / KEPT / RECLAIMED / FRESH
    counts: dict


def _concat_retired(parts: list[RetiredTable]) -> RetiredTable:
    return RetiredTable(
        *(
            np.concatenate([getattr(p, f) for p in parts])
            for f in ("ids", "fp", "sid", "tok", "seq", "reason")
        )
    )


def fresh_dedup_codes(codes_FL: np.ndarray, used_UM: np.ndarray) -> np.ndarray:
    """Dedup codes for fresh items (rows in ItemID order) avoiding every ID in used_UM.

    Within a group of rows sharing an L-tuple, the r-th row gets the r-th smallest integer d
    such that (tuple, d) is not in used_UM: the same as handing out, row by row, the smallest
    free code. Vectorised: for the group's used codes a_0 < a_1 < ..., m_i = a_i - i counts the
    free codes below a_i; the r-th free code is r + #{i : m_i <= r}.
    """
    n_fresh, L = codes_FL.shape
    if n_fresh == 0:
        return np.zeros(0, np.int64)
    used_UM = used_UM.reshape(-1, L + 1)
    _, first, order = row_groups(used_UM)
    used_UM = used_UM[order[first]]  # distinct IDs
    group, _, _ = row_groups(np.concatenate([codes_FL, used_UM[:, :L]]).astype(np.int64))
    g_F, g_U = group[:n_fresh], group[n_fresh:]
    # rank of each fresh row within its group, in row (ItemID) order
    order = np.argsort(g_F, kind="stable")
    g_sorted = g_F[order]
    start = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    counts = np.diff(np.r_[start, n_fresh])
    rank_sorted = np.arange(n_fresh) - np.repeat(start, counts)
    r_F = np.empty(n_fresh, np.int64)
    r_F[order] = rank_sorted
    if used_UM.shape[0] == 0:
        return r_F
    # used codes per group: sorted by (group, dedup), m = dedup - index within group
    d_U = used_UM[:, L].astype(np.int64)
    o = np.lexsort([d_U, g_U])
    g_u, d_u = g_U[o], d_U[o]
    ustart = np.flatnonzero(np.r_[True, g_u[1:] != g_u[:-1]])
    idx_in_group = np.arange(g_u.size) - np.repeat(ustart, np.diff(np.r_[ustart, g_u.size]))
    m_u = d_u - idx_in_group
    assert (m_u >= 0).all(), "negative dedup code in history"
    base = int(max(m_u.max(), r_F.max())) + 1
    assert (int(group.max()) + 1) * base < 2**62, "too many IDs for the int64 search key"
    key_u = g_u * base + m_u  # sorted: by group, then m (non-decreasing within a group)
    below = np.searchsorted(key_u, g_F * base + r_F, side="right") - np.searchsorted(
        key_u, g_F * base, side="left"
    )
    return r_F + below


def _reclaim(ids_Q: np.ndarray, fp_Q: np.ndarray, retired: RetiredTable) -> np.ndarray:
    """Row of `retired` to give back to each query item (ItemID, fingerprint), or -1."""
    out = np.full(ids_Q.shape[0], -1, np.int64)
    if len(retired) == 0 or ids_Q.size == 0:
        return out
    # preference within an ItemID: latest retirement first, then smallest ID
    sid_keys = [retired.sid[:, j] for j in range(retired.sid.shape[1] - 1, -1, -1)]
    pref = np.lexsort(sid_keys + [-retired.seq, retired.ids])
    r_ids = retired.ids[pref]
    lo = np.searchsorted(r_ids, ids_Q, side="left")
    hi = np.searchsorted(r_ids, ids_Q, side="right")
    n_cand = hi - lo
    q = np.repeat(np.arange(ids_Q.size), n_cand)
    cand = np.arange(n_cand.sum()) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand) + np.repeat(lo, n_cand)
    match = retired.fp[pref[cand]] == fp_Q[q]
    q, cand = q[match], cand[match]
    first = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if q.size else q
    out[q[first]] = pref[cand[first]]
    return out


@dataclass
class _Match:
    """Tonight's items against the previous generation's."""

    pos: np.ndarray  # the previous row of each item (meaningful where in_prev)
    in_prev: np.ndarray
    stable: np.ndarray  # same ItemID, same embedding fingerprint
    changed: np.ndarray  # same ItemID, another embedding
    kept: np.ndarray  # changed, and keeps its ID (same tokenizer, same codes)


@dataclass
class Relocated:
    """The collision policy relocate applied elsewhere (in Ray tasks: pipeline/relocation.py),
    for ``assign``: tonight's codes and dedup codes after relocation over all of tonight's rows,
    and the candidates of the rows that may need a fresh ID only (at least every row that is not
    stable against the previous generation; none on a first night, which takes the relocation
    as it is)."""

    codes_NL: np.ndarray
    dedup_N: np.ndarray
    rows: np.ndarray  # sorted rows that have candidates
    cand_RK: np.ndarray
    err_RK: np.ndarray

    def candidates(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.minimum(np.searchsorted(self.rows, rows), max(len(self.rows) - 1, 0))
        assert len(self.rows) and (self.rows[at] == rows).all(), "no candidates for a fresh item"
        return self.cand_RK[at], self.err_RK[at]


def _match(prev: IdTable, ids_N, fp_N, codes_NL, tok, policy, cand_NK, err_NK, relocated=None) -> _Match:
    n, L = codes_NL.shape
    pos = np.minimum(np.searchsorted(prev.ids, ids_N), max(len(prev) - 1, 0))
    in_prev = (prev.ids[pos] == ids_N) if len(prev) else np.zeros(n, bool)
    stable = in_prev & (prev.fp[pos] == fp_N) if len(prev) else in_prev
    changed = in_prev & ~stable
    kept = np.zeros(n, bool)
    if policy == "keep_if_same_codes" and changed.any():
        if relocated is not None:
            after_NL = relocated.codes_NL
        else:
            after_NL = codes_NL if cand_NK is None else relocate(ids_N, codes_NL, cand_NK, err_NK).codes_NL
        kept = changed & (prev.tok[pos] == tok) & (prev.sid[pos, :L] == after_NL).all(axis=1)
    return _Match(pos, in_prev, stable, changed, kept)


def _fresh_ids(sid_NM, fresh, ids_N, codes_NL, cand_NK, err_NK, used_UM, relocated=None) -> None:
    """Fill the rows `fresh` (ascending, so in ItemID order) of sid_NM with IDs no one holds."""
    L = codes_NL.shape[1]
    if cand_NK is None and relocated is None:  # suffix
        sid_NM[fresh, :L] = codes_NL[fresh]
        sid_NM[fresh, L] = fresh_dedup_codes(codes_NL[fresh].astype(np.int64), used_UM)
        return
    if relocated is not None and not len(used_UM) and fresh.size == len(ids_N):
        sid_NM[:, :L], sid_NM[:, L] = relocated.codes_NL, relocated.dedup_N  # no history: as is
        return
    if fresh.size:
        c_FK, e_FK = relocated.candidates(fresh) if relocated is not None else (cand_NK[fresh], err_NK[fresh])
        rel = relocate(ids_N[fresh], codes_NL[fresh], c_FK, e_FK, used_UM[:, :L])
        serve = np.lexsort([ids_N[fresh], ~rel.stays_N])  # the item that kept its codes first
        sid_NM[fresh, :L] = rel.codes_NL
        sid_NM[fresh[serve], L] = fresh_dedup_codes(rel.codes_NL[serve], used_UM)


def _retire(prev: IdTable, retired: RetiredTable, m: _Match, rec_rows, seq: int):
    """The retired list after tonight: the previous one less what was reclaimed, plus previous
    IDs whose item is gone, or changed and not kept. Also returns the gone and retired counts."""
    gone_P = np.ones(len(prev), bool)
    gone_P[m.pos[m.in_prev]] = False
    moved_P = np.zeros(len(prev), bool)
    moved_P[m.pos[m.changed & ~m.kept]] = True
    retire_P = np.flatnonzero(gone_P | moved_P)
    reason = np.where(gone_P[retire_P], REMOVED, CHANGED).astype(np.int8)
    newly = RetiredTable(
        prev.ids[retire_P],
        prev.fp[retire_P],
        prev.sid[retire_P],
        prev.tok[retire_P],
        np.full(retire_P.size, seq, np.int64),
        reason,
    )
    survivors = np.setdiff1d(np.arange(len(retired)), rec_rows)
    all_retired = _concat_retired([retired.take(survivors), newly])
    return all_retired.take(lex_order(all_retired.sid)), int(gone_P.sum()), int(retire_P.size)


def assign(
    prev: IdTable,
    retired: RetiredTable,
    ids_N: np.ndarray,
    fp_N: np.ndarray,
    codes_NL: np.ndarray,
    tok: int,
    seq: int,
    policy: str = "keep_if_same_codes",
    cand_NK: np.ndarray | None = None,
    err_NK: np.ndarray | None = None,
    relocated: Relocated | None = None,
) -> Assignment:
    """Tonight's semantic IDs (rules in the module docstring). ids_N sorted, unique. With the
    last-level candidates (cand_NK, err_NK: math/relocate.py), or the relocation done elsewhere
    (relocated), the collision policy is relocate, without them suffix."""
    if policy not in POLICIES:
        raise ValueError(f"changed-item policy {policy!r}: choose one of {', '.join(POLICIES)}")
    n, L = codes_NL.shape
    M = L + 1
    assert ids_N.shape == (n,) and fp_N.shape == (n,)
    assert n == 0 or (np.diff(ids_N) > 0).all(), "ItemIDs must be sorted and unique"
    assert len(prev) == 0 or (np.diff(prev.ids) > 0).all(), "previous ItemIDs must be sorted and unique"
    assert prev.sid.shape[1] == M and retired.sid.shape[1] == M, "ID width differs from L + 1"
    ids_N = ids_N.astype(np.int64)
    fp_N = fp_N.astype(np.uint64)
    tok = np.uint64(tok)
    m = _match(prev, ids_N, fp_N, codes_NL, tok, policy, cand_NK, err_NK, relocated)

    sid_NM = np.zeros((n, M), np.int64)
    tok_N = np.full(n, tok, np.uint64)
    status_N = np.full(n, FRESH, np.int8)
    keep = m.stable | m.kept
    sid_NM[keep], tok_N[keep] = prev.sid[m.pos[keep]], prev.tok[m.pos[keep]]
    status_N[m.stable], status_N[m.kept] = STABLE, KEPT

    rest = np.flatnonzero(~keep)
    back = _reclaim(ids_N[rest], fp_N[rest], retired)
    rec_rows, rec_items = back[back >= 0], rest[back >= 0]
    sid_NM[rec_items], tok_N[rec_items] = retired.sid[rec_rows], retired.tok[rec_rows]
    status_N[rec_items] = RECLAIMED

    fresh = rest[back < 0]
    used_UM = np.concatenate([prev.sid, retired.sid]).astype(np.int64)
    _fresh_ids(sid_NM, fresh, ids_N, codes_NL, cand_NK, err_NK, used_UM, relocated)
    all_retired, n_gone, n_retired = _retire(prev, retired, m, rec_rows, seq)

    mapping = IdTable(ids_N, fp_N, sid_NM, tok_N)
    assert row_groups(np.concatenate([sid_NM, all_retired.sid]))[1].all(), (
        "an ID is held twice (two items, or an item and the retired list)"
    )
    counts = {
        "items": n,
        "stable": int(m.stable.sum()),
        "new": int((~m.in_prev).sum()),
        "changed": int(m.changed.sum()),
        "removed": n_gone,
        "changed_kept_id": int(m.kept.sum()),
        "reclaimed": int(rec_items.size),
        "fresh_ids": int(fresh.size),
        "retired_tonight": n_retired,
        "retired_total": len(all_retired),
        "max_dedup_code": int(sid_NM[:, L].max()) if n else 0,
    }
    return Assignment(mapping, all_retired, status_N, counts)
