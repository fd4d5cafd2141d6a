"""The ``relocate`` collision policy: colliding items move to free last-level codes.

Items that share all L codes form a group. Under ``suffix`` every member keeps the codes and the
dedup code (the (L+1)-th) tells them apart. Under ``relocate``:

1. In each group of two or more, the item nearest its codes (least squared reconstruction
   error; ties: smaller ItemID) keeps them. The others are *movers*.
2. A mover may take a last-level code under the same first L-1 codes (its *prefix*) that no
   item holds: not a staying item, not a mover already placed. Its candidates are the
   ``k`` last-level codes nearest to what its first L-1 codes leave of it (the encode pass
   keeps them with the error each would give: ``last_level_candidates``).
3. Placement is greedy over all (mover, candidate) pairs of a prefix in ascending candidate
   error; ties go to the smaller ItemID, then to the smaller code. A pair is taken when its mover
   is still unplaced and its code still free.
4. A mover with no free candidate keeps its codes and gets a suffix: the item that kept the
   codes has dedup code 0, the movers left with it 1, 2, ... in ItemID order.

The result depends only on the rows' (ItemID, codes, candidates, errors), never on row order or
sharding, and each prefix is decided on its own: ``relocate`` applied to any split of the rows
that keeps every prefix group whole gives the same codes (so the step can run per prefix group,
e.g. as a Ray Data groupby on the prefix, as well as over all rows in one process).

The greedy order is resolved in rounds without a Python loop over pairs: a pair that comes first
both among its mover's remaining pairs and among its slot's remaining pairs is taken by the
sequential greedy as well (every pair before it involves other movers and other slots), so all
such pairs are taken at once, the pairs of taken movers and slots dropped, and the round
repeated. Each round takes at least the first remaining pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semid_dist.math.dedup import row_groups


@dataclass
class Relocation:
    codes_NL: np.ndarray  # the codes after the policy (rows as given)
    dedup_N: np.ndarray  # the dedup code of every row (with occupied tuples: see relocate())
    stays_N: np.ndarray  # bool: kept its own codes as the nearest of its group
    moved_N: np.ndarray  # bool: placed on another last-level code
    suffix_N: np.ndarray  # bool: shares its codes with another item (dedup code > 0)
    err_delta: float  # sum of (new error - own error) over the moved items


def last_level_candidates_np(
    x_ND: np.ndarray, codebooks_LKD, codes_NL: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each row: its own last code and the k-1 other last-level codes nearest to what its
    first L-1 codes leave of it (int32, (N, k)), and the squared error each gives (float32), with
    the own code in column 0 and the others by ascending error, then code.

    Every row is computed on its own through nearest_np's blocked GEMM, so the result of a row
    does not depend on the other rows of its batch."""
    from semid_dist.math.nearest_np import CHUNK, _gemm_rows

    books = [np.asarray(cb, np.float32) for cb in codebooks_LKD]
    last = books[-1]
    n, n_codes = x_ND.shape[0], last.shape[0]
    k = min(k, n_codes)
    c_norm = np.einsum("kd,kd->k", last, last)
    cand = np.empty((n, k), np.int32)
    err = np.empty((n, k), np.float32)
    for s in range(0, n, CHUNK):
        r_BD = np.array(x_ND[s : s + CHUNK], np.float32)
        c_BL = codes_NL[s : s + CHUNK]
        for level, cb in enumerate(books[:-1]):
            r_BD -= cb[c_BL[:, level]]
        e_BK = _gemm_rows(r_BD, last)
        e_BK *= -2.0
        e_BK += c_norm
        e_BK += np.einsum("bd,bd->b", r_BD, r_BD)[:, None]
        np.maximum(e_BK, 0.0, out=e_BK)
        cand[s : s + CHUNK], err[s : s + CHUNK] = _top_candidates(e_BK, c_BL[:, -1], k)
    return cand, err


def _top_candidates(e_BK: np.ndarray, own_B: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column 0: the own code and its error; then the k-1 best other codes (error, then code)."""
    b = e_BK.shape[0]
    own_B = np.asarray(own_B, np.int64)
    own_err = e_BK[np.arange(b), own_B].copy()
    e_BK[np.arange(b), own_B] = np.inf  # the own code is not one of the others
    m = k - 1
    out_c = np.empty((b, k), np.int32)
    out_e = np.empty((b, k), np.float32)
    out_c[:, 0], out_e[:, 0] = own_B, own_err
    if m > 0:
        if m < e_BK.shape[1]:
            # the m smallest, with ties at the boundary settled by the lower code: partition on
            # m + a margin, then sort exactly by (error, code)
            part = np.argpartition(e_BK, m - 1, axis=1)[:, :m]
            thresh = np.take_along_axis(e_BK, part, axis=1).max(axis=1)
            if (np.sum(e_BK <= thresh[:, None], axis=1) > m).any():  # ties at the threshold
                part = np.argsort(e_BK, axis=1, kind="stable")[:, :m]
        else:
            part = np.broadcast_to(np.arange(e_BK.shape[1]), e_BK.shape)
        pe = np.take_along_axis(e_BK, part, axis=1)
        order = np.lexsort((part, pe), axis=1)
        out_c[:, 1:] = np.take_along_axis(part, order, axis=1)[:, :m]
        out_e[:, 1:] = np.take_along_axis(pe, order, axis=1)[:, :m]
    return out_c, out_e


def relocate(
    ids_N: np.ndarray,
    codes_NL: np.ndarray,
    cand_NK: np.ndarray,
    err_NK: np.ndarray,
    occupied_UL: np.ndarray | None = None,
) -> Relocation:
    """Apply the rule in the module docstring. cand_NK / err_NK: column 0 the row's own last code
    and its error, then its other candidates. occupied_UL: L-code tuples held by items outside
    these rows (the nightly job's kept IDs); no row keeps or takes one of those, and the dedup
    codes of rows left on one must then be chosen against the IDs that hold it (the caller's)."""
    ids_N = np.asarray(ids_N, np.int64)
    codes_NL = np.asarray(codes_NL, np.int64)
    n, n_levels = codes_NL.shape
    new_codes = codes_NL.copy()
    moved = np.zeros(n, bool)
    if n == 0:
        return Relocation(new_codes, np.zeros(0, np.int64), moved.copy(), moved, moved.copy(), 0.0)
    n_codes = int(max(codes_NL.max(), cand_NK.max())) + 1
    if occupied_UL is not None and len(occupied_UL):
        n_codes = max(n_codes, int(np.asarray(occupied_UL).max()) + 1)
    own_err = err_NK[:, 0].astype(np.float64)

    occ = np.zeros((0, n_levels), np.int64) if occupied_UL is None else np.asarray(occupied_UL, np.int64)
    base_N, occ_base = _slot_bases(codes_NL, occ, n_codes)  # slot of (row's prefix, c) = base + c
    stays, taken = _stayers(ids_N, base_N + codes_NL[:, -1], own_err, occ_base + occ[:, -1])
    movers = np.flatnonzero(~stays)
    if movers.size == 0:
        return _finish(ids_N, new_codes, moved, stays, 0.0)
    movers = movers[np.argsort(ids_N[movers], kind="stable")]
    p_mover, p_code, p_err, p_slot = _free_pairs(movers, base_N, cand_NK, err_NK, taken)
    placed_code, placed_err = _greedy(p_mover, p_code, p_err, p_slot, movers.size)
    ok = placed_code >= 0
    rows = movers[ok]
    new_codes[rows, -1] = placed_code[ok]
    moved[rows] = True
    delta = float((placed_err[ok] - own_err[rows]).sum())
    return _finish(ids_N, new_codes, moved, stays, delta)


def _stayers(ids_N, key_N, own_err, occ_key) -> tuple[np.ndarray, np.ndarray]:
    """1. Groups of identical codes (key_N: each row's slot); the stayer of each is the least
    error, then the smallest ItemID; a row on a slot held outside these rows (occ_key) stays
    nowhere. Returns (stays, the sorted slots taken by a stayer or from outside)."""
    n = len(ids_N)
    by_key = np.argsort(key_N, kind="stable")
    k_sorted = key_N[by_key]
    start = np.r_[True, k_sorted[1:] != k_sorted[:-1]]
    size = np.diff(np.r_[np.flatnonzero(start), n])
    shared = np.repeat(size > 1, size)  # in key order: the row's group has others
    stays = np.zeros(n, bool)
    stays[by_key[start & ~shared]] = True  # alone in its group
    rows = by_key[shared]
    if rows.size:  # groups of two or more: the nearest stays
        o = np.lexsort([ids_N[rows], own_err[rows], key_N[rows]])
        g = key_N[rows][o]
        stays[rows[o][np.r_[True, g[1:] != g[:-1]]]] = True
    taken = np.unique(np.concatenate([k_sorted[start], occ_key]))
    if occ_key.shape[0]:
        stays &= ~_sorted_has(np.unique(occ_key), key_N)  # held outside these rows
    return stays, taken


def _free_pairs(movers, base_N, cand_NK, err_NK, taken):
    """2. The (mover, candidate) pairs in greedy order (error, then ItemID, then code): movers in
    ItemID order, each mover's candidates by (error, code), then one stable sort on the error;
    3. only free slots can be taken. Returns (mover index, code, error, dense slot number)."""
    m, k = movers.size, cand_NK.shape[1]
    c_MC = cand_NK[movers, 1:].astype(np.int64)
    e_MC = err_NK[movers, 1:].astype(np.float32)
    de, dc = np.diff(e_MC, axis=1), np.diff(c_MC, axis=1)
    if not ((de > 0) | ((de == 0) & (dc > 0))).all():  # last_level_candidates sorts them already
        within = np.lexsort((c_MC, e_MC), axis=1)
        c_MC, e_MC = np.take_along_axis(c_MC, within, axis=1), np.take_along_axis(e_MC, within, axis=1)
    p_code, p_err = c_MC.ravel(), e_MC.ravel()
    p_mover = np.repeat(np.arange(m), k - 1)
    p_slot = np.repeat(base_N[movers], k - 1) + p_code
    o = np.flatnonzero(~_sorted_has(taken, p_slot))
    o = o[np.argsort(p_err[o], kind="stable")]
    p_mover, p_code, p_err, p_slot = p_mover[o], p_code[o], p_err[o], p_slot[o]
    by_slot = np.argsort(p_slot, kind="stable")  # dense slot numbers, without np.unique
    s_sorted = p_slot[by_slot]
    new_slot = np.r_[True, s_sorted[1:] != s_sorted[:-1]] if s_sorted.size else np.zeros(0, bool)
    dense = np.empty(p_slot.size, np.int64)
    dense[by_slot] = np.cumsum(new_slot) - 1
    return p_mover, p_code, p_err, dense


def _greedy(p_mover, p_code, p_err, p_slot, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs taken in order, each when neither its mover nor its slot is done yet; rounds
    of 'first of its mover and first of its slot' give the sequential result in a few passes.
    Returns each mover's placed code (-1: none) and its error."""
    n_slots = int(p_slot.max()) + 1 if p_slot.size else 0
    placed_code = np.full(m, -1, np.int64)
    placed_err = np.zeros(m, np.float64)
    mover_done = np.zeros(m, bool)
    slot_done = np.zeros(n_slots, bool)
    rank = np.arange(p_mover.size)
    while rank.size:
        take = rank[_is_first(p_mover[rank], m) & _is_first(p_slot[rank], n_slots)]
        placed_code[p_mover[take]] = p_code[take]
        placed_err[p_mover[take]] = p_err[take]
        mover_done[p_mover[take]] = True
        slot_done[p_slot[take]] = True
        rank = rank[~mover_done[p_mover[rank]] & ~slot_done[p_slot[rank]]]
    return placed_code, placed_err


def _finish(ids_N, new_codes, moved, stays, delta) -> Relocation:
    # 4. dedup codes on the new codes: the item that kept its codes first, then ItemID order
    group_N, _, _ = row_groups(new_codes)
    order = np.lexsort([ids_N, ~stays & ~moved, group_N])
    g_sorted = group_N[order]
    n = len(ids_N)
    start = np.maximum.accumulate(np.where(np.r_[True, g_sorted[1:] != g_sorted[:-1]], np.arange(n), 0))
    dedup = np.empty(n, np.int64)
    dedup[order] = np.arange(n) - start
    return Relocation(new_codes, dedup, stays, moved, dedup > 0, delta)


def _is_first(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Whether each position holds the first occurrence of its key (keys in [0, n_keys))."""
    first = np.full(n_keys, keys.size, np.int64)
    np.minimum.at(first, keys, np.arange(keys.size))
    return first[keys] == np.arange(keys.size)


def _slot_bases(codes_NL: np.ndarray, occ_UL: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """An int64 base per row (and per occupied tuple) such that base + last code numbers the slot
    (prefix, last code): the prefix's codes packed in base n_codes when that fits int64, else the
    prefix's dense number times n_codes."""
    n, n_levels = codes_NL.shape
    pre = np.concatenate([codes_NL[:, :-1], occ_UL[:, :-1]])
    if n_codes**n_levels < 2**62:
        key = np.zeros(pre.shape[0], np.int64)
        for j in range(n_levels - 1):
            key = key * n_codes + pre[:, j]
    else:
        key = row_groups(pre)[0] if n_levels > 1 else np.zeros(pre.shape[0], np.int64)
    key *= n_codes
    return key[:n], key[n:]


def _sorted_has(sorted_keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Whether each of q is in sorted_keys (sorted, unique)."""
    if sorted_keys.size == 0:
        return np.zeros(q.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_keys, q), sorted_keys.size - 1)
    return sorted_keys[pos] == q
