"""The prefix tree of a set of semantic IDs: for every prefix, the codes that may follow it.

Constrained beam search in a generative recommender decodes one code at a time and may only
emit a code that keeps the sequence on the path of some real item's ID; this is the table it
needs. Depth d (0 .. M-1) holds every distinct prefix of d codes that some ID starts with, and
the sorted codes that follow it in some ID; the complete paths are exactly the IDs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semid_dist.math.dedup import lex_order


@dataclass
class Level:
    depth: int
    prefixes_PD: np.ndarray  # (P, depth) int64, sorted lexicographically
    offsets_P1: np.ndarray  # (P + 1,) int64: the next codes of prefix p are next_C[offsets[p]:offsets[p+1]]
    next_C: np.ndarray  # int64, sorted within each prefix


def prefix_tree(sid_NM: np.ndarray) -> list[Level]:
    """The tree of the IDs (N, M): one Level per depth 0 .. M-1. One sort of the rows, then each
    depth is read off the sorted rows. Memory beyond the sorted copy: one flag per row, and the
    distinct prefixes of each depth (the rows themselves at the last, since IDs are unique)."""
    n, m = sid_NM.shape
    s = sid_NM[lex_order(sid_NM)] if n else sid_NM
    levels = []
    first = np.zeros(n, bool)  # the first row of every distinct prefix of depth + 1 codes
    if n:
        first[0] = True
    for depth in range(m):
        if n > 1:
            first[1:] |= s[1:, depth] != s[:-1, depth]
        u = s if first.all() else s[first, : depth + 1]
        new = np.ones(len(u), bool)  # the first of every distinct prefix of depth codes among them
        if len(u) > 1 and depth:
            new[1:] = (u[1:, :depth] != u[:-1, :depth]).any(axis=1)
        elif len(u) > 1:
            new[1:] = False
        starts = np.flatnonzero(new)
        levels.append(
            Level(
                depth, u[starts, :depth], np.r_[starts, len(u)].astype(np.int64), u[:, depth].astype(np.int64)
            )
        )
    return levels


def paths(levels: list[Level]) -> set[tuple[int, ...]]:
    """Every complete path of the tree (slow and obvious: for tests and small catalogs)."""
    allowed = [
        {
            tuple(lv.prefixes_PD[p]): lv.next_C[lv.offsets_P1[p] : lv.offsets_P1[p + 1]]
            for p in range(len(lv.prefixes_PD))
        }
        for lv in levels
    ]
    out: set[tuple[int, ...]] = set()

    def walk(prefix: tuple[int, ...]) -> None:
        if len(prefix) == len(levels):
            out.add(prefix)
            return
        for code in allowed[len(prefix)].get(prefix, ()):
            walk((*prefix, int(code)))

    walk(())
    return out
