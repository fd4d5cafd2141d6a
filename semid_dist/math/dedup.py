"""Deterministic dedup code: the extra last code that makes every semantic ID unique.

Within a group of items sharing the same L-tuple, items are ranked by ItemID: the smallest
gets 0, the next 1, ... The result depends only on (ItemID, codes) pairs, never on row order
or on how the catalog was sharded across workers.
"""

from __future__ import annotations

import math

import numpy as np


def dedup_codes(item_ids_N: np.ndarray, codes_NL: np.ndarray) -> np.ndarray:
    """Return the dedup code of every row (same order as the input)."""
    n = item_ids_N.shape[0]
    assert codes_NL.shape[0] == n
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group_N = row_groups(codes_NL)[0]  # numbered in the codes' lexicographic order
    order = np.lexsort([item_ids_N, group_N])  # by codes; ItemID breaks ties (lexsort: last key first)
    sorted_group = group_N[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank_sorted = np.arange(n) - group_start
    out = np.empty(n, dtype=np.int64)
    out[order] = rank_sorted
    return out


def suffix_dedup(codes_NL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dedup_codes for rows already in ItemID order, with one sort: (the dedup code of every row,
    the size of every group in the groups' lexicographic order). The catalog-scale path: the
    group sizes give the collision rate and the group-size histogram without sorting again."""
    n = codes_NL.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, order = row_groups(codes_NL)  # a stable sort: ItemID order within each group
    starts = np.flatnonzero(first)
    del first
    sizes = np.diff(np.append(starts, n))
    rank = np.arange(n, dtype=np.int64)
    rank -= np.repeat(starts, sizes)
    dedup = np.empty(n, np.int64)
    dedup[order] = rank
    return dedup, sizes


def packed_key(rows_NM: np.ndarray) -> np.ndarray | None:
    """One int64 per row that orders like the row (first column first), when the columns hold
    non-negative integers whose value ranges multiply to less than 2**63 (codes always do);
    else None. Sorting this one key is faster than a lexsort over the columns, which sorts once
    per column."""
    if rows_NM.ndim != 2 or rows_NM.dtype.kind not in "iu" or 0 in rows_NM.shape:
        return None
    if rows_NM.dtype.kind == "i" and int(rows_NM.min()) < 0:
        return None
    spans = [int(v) + 1 for v in rows_NM.max(axis=0)]
    if math.prod(spans) >= 2**63:
        return None
    key_N = np.zeros(rows_NM.shape[0], np.int64)
    for j, span in enumerate(spans):
        key_N *= span
        key_N += rows_NM[:, j].astype(np.int64, copy=False)  # < 2**63: exact, uint64 included
    return key_N


def lex_order(rows_NM: np.ndarray) -> np.ndarray:
    """The permutation that sorts the rows lexicographically (first column first); equal rows
    keep their order."""
    key_N = packed_key(rows_NM)
    if key_N is not None:
        return np.argsort(key_N, kind="stable")
    return np.lexsort([rows_NM[:, j] for j in range(rows_NM.shape[1] - 1, -1, -1)])


def row_groups(rows_NM: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group of every row, numbered in lexicographic order of the rows; first-of-its-group flag
    in that order; the order itself).

    Not np.unique(axis=0): it sorts a structured view, far slower than a lexsort on large arrays."""
    n = rows_NM.shape[0]
    first = np.ones(n, bool)
    key_N = packed_key(rows_NM)
    if key_N is not None:
        order = np.argsort(key_N, kind="stable")
        s = key_N[order]
        first[1:] = s[1:] != s[:-1]
    else:
        order = lex_order(rows_NM)
        s = rows_NM[order]
        first[1:] = (s[1:] != s[:-1]).any(axis=1)
    group = np.empty(n, np.int64)
    group[order] = np.cumsum(first) - 1
    return group, first, order
