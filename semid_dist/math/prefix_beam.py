"""Beam search for a generative retriever, constrained to the semantic IDs of real items (torch).

A retriever trained on semantic IDs decodes an item one code at a time. Unconstrained, it can
emit a code sequence that is no item's ID; here, at every depth, only codes that keep a beam on
the path of some item's ID are candidates. The rules:

- ``PrefixTree`` holds, for depth d = 0 .. M-1, the distinct prefixes of d + 1 codes (its nodes)
  in lexicographic order: each node's code at depth d, and a CSR of its children among depth
  d + 1's nodes (contiguous, since they share the node's prefix). The last depth's nodes are the
  IDs themselves, one per item (rows must be unique), with the item row of each.
- A beam is a node; its score is the sum of the log-probabilities of its codes. At depth d every
  child of every live beam is a candidate, and each query keeps its best ``beam_size``
  candidates; fewer when fewer exist, the rest padding (node -1, score -inf, codes 0 so the
  model still gets a valid input), which has no children and is never returned.
- At the last depth, leaves in the query's exclusion set (items the user has seen) are dropped
  before the query's best ``top_k`` items are taken, best first, padded with -1 / -inf.
- Ties go to the lower node (the lexicographically smaller prefix); at the last depth to the
  lower item row. Scores are summed in float64, so the order does not depend on the model's
  dtype beyond its own rounding.

Candidates are one flat list over all queries and beams (CSR arithmetic: repeat_interleave over
child counts), with a query's best found by stable sorts; nothing loops over queries or beams
and nothing is dense in the vocabulary beyond the model's own (Q, B, V_d) output. When there are
far more candidates than kept (one token per item: every item is a child of the root), a top-k
over a dense (Q, most candidates of a query) block first drops those below each query's k-th
best score. Memory per depth is some 50 bytes per candidate, i.e. per child of a live beam:
callers batch queries so that Q x beam_size x children per node fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from semid_dist.math.dedup import lex_order


@dataclass(frozen=True)
class PrefixTree:
    """The tree of a catalog's semantic IDs (see the module docstring), as int64 tensors."""

    depth: int  # M, the codes per ID
    vocab_sizes: list[int]  # V_d = 1 + the largest code at depth d
    code_P: list[torch.Tensor]  # per depth d: the code at depth d of every node (P_d,)
    child_offsets_P1: list[torch.Tensor]  # per depth d < M - 1: (P_d + 1,), children into depth d + 1
    leaf_item_N: torch.Tensor  # the row of sid_NM of every leaf (the nodes of depth M - 1)

    @classmethod
    def build(cls, sid_NM: np.ndarray) -> PrefixTree:
        """The tree of the IDs (N, M), non-negative integers, unique rows. One sort of the rows;
        each depth's nodes are the sorted rows where the prefix changes."""
        sid_NM = np.asarray(sid_NM)
        if sid_NM.ndim != 2 or 0 in sid_NM.shape:
            raise ValueError(f"semantic IDs must be a non-empty (N, M) array, got shape {sid_NM.shape}")
        if sid_NM.dtype.kind not in "iu" or sid_NM.min() < 0:
            raise ValueError("semantic IDs must be non-negative integers")
        n, m = sid_NM.shape
        order_N = lex_order(sid_NM)
        s_NM = sid_NM[order_N].astype(np.int64)
        first_N = np.zeros(n, bool)  # the first sorted row of every distinct prefix of d + 1 codes
        first_N[0] = True
        codes, offsets, prev_starts = [], [], None
        for d in range(m):
            first_N[1:] |= s_NM[1:, d] != s_NM[:-1, d]
            starts = np.flatnonzero(first_N)
            codes.append(torch.from_numpy(s_NM[starts, d]))
            if prev_starts is not None:
                # a node's first child starts at the node's own first row (prefixes only split)
                first_child = np.searchsorted(starts, prev_starts)
                offsets.append(torch.from_numpy(np.append(first_child, len(starts)).astype(np.int64)))
            prev_starts = starts
        if not first_N.all():
            raise ValueError("semantic IDs must be unique: some rows are equal")
        vocab = [int(v) + 1 for v in sid_NM.max(axis=0)]
        return cls(m, vocab, codes, offsets, torch.from_numpy(order_N.astype(np.int64)))

    @property
    def n_items(self) -> int:
        return int(self.leaf_item_N.shape[0])

    def to(self, device) -> PrefixTree:
        """The same tree on `device` (self when it is there already)."""
        dev = torch.device(device)
        here = self.leaf_item_N.device
        if here == dev or (dev.index is None and here.type == dev.type):
            return self
        return PrefixTree(
            self.depth,
            list(self.vocab_sizes),
            [c.to(dev) for c in self.code_P],
            [o.to(dev) for o in self.child_offsets_P1],
            self.leaf_item_N.to(dev),
        )


LogprobFn = Callable[[int, torch.Tensor], torch.Tensor]


def beam_search(
    tree: PrefixTree,
    logprob_fn: LogprobFn,
    n_queries: int,
    beam_size: int,
    top_k: int,
    exclude_offsets_Q1: np.ndarray | None = None,
    exclude_items: np.ndarray | None = None,
    device="cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The top_k items (rows of the tree's sid_NM) of every query, best first, and their scores:
    (items_QK int64 padded with -1, scores_QK float64 padded with -inf).

    logprob_fn(d, prefix_QBd) gives the (Q, B, >= V_d) log-probabilities of the code at depth d
    after each beam's d codes (at d = 0, B = 1 and the prefix is empty; later B is beam_size, or
    the most candidates any query had when that is fewer). A model's -inf on a valid code keeps
    the candidate (a real item, scored -inf); NaN is an error. The exclusion set of query q is
    exclude_items[exclude_offsets_Q1[q]:exclude_offsets_Q1[q + 1]] (item rows)."""
    if beam_size < 1 or not 1 <= top_k <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= top_k <= beam_size, got {beam_size} and {top_k}")
    if n_queries < 0:
        raise ValueError(f"n_queries must be >= 0, got {n_queries}")
    if n_queries == 0:
        return np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float64)
    tree = tree.to(device)
    dev = tree.leaf_item_N.device
    excl_key = _exclusion_keys(tree.n_items, n_queries, exclude_offsets_Q1, exclude_items)
    excl_key = None if excl_key is None else excl_key.to(dev)
    node_QB = torch.zeros((n_queries, 1), dtype=torch.long, device=dev)  # the root
    score_QB = torch.zeros((n_queries, 1), dtype=torch.float64, device=dev)
    prefix_QBd = torch.zeros((n_queries, 1, 0), dtype=torch.long, device=dev)
    for d in range(tree.depth - 1):
        row_C, child_C, code_C, score_C, query_C = _expand(tree, d, logprob_fn, node_QB, score_QB, prefix_QBd)
        sel_S, query_S, rank_S, width = _best_per_query(query_C, score_C, child_C, n_queries, beam_size)
        q, b = node_QB.shape
        node_QB = torch.full((q, width), -1, dtype=torch.long, device=dev)
        node_QB[query_S, rank_S] = child_C[sel_S]
        score_QB = torch.full((q, width), -torch.inf, dtype=torch.float64, device=dev)
        score_QB[query_S, rank_S] = score_C[sel_S]
        path_SD = torch.cat([prefix_QBd.reshape(q * b, d)[row_C[sel_S]], code_C[sel_S, None]], dim=1)
        prefix_QBd = torch.zeros((q, width, d + 1), dtype=torch.long, device=dev)
        prefix_QBd[query_S, rank_S] = path_SD
    last = tree.depth - 1
    _, child_C, _, score_C, query_C = _expand(tree, last, logprob_fn, node_QB, score_QB, prefix_QBd)
    return _final(tree, query_C, tree.leaf_item_N[child_C], score_C, n_queries, top_k, excl_key)


def _expand(tree: PrefixTree, d: int, logprob_fn: LogprobFn, node_QB, score_QB, prefix_QBd):
    """Every candidate at depth d: (its beam's row in the flat (Q * B) block, its node, its code,
    its score, its query)."""
    logp_QBV = logprob_fn(d, prefix_QBd)
    q, b = node_QB.shape
    if logp_QBV.ndim != 3 or logp_QBV.shape[:2] != (q, b) or logp_QBV.shape[2] < tree.vocab_sizes[d]:
        raise ValueError(
            f"logprob_fn at depth {d} must return ({q}, {b}, >= {tree.vocab_sizes[d]}), "
            f"got {tuple(logp_QBV.shape)}"
        )
    row_C, child_C = _children(tree, d, node_QB.reshape(-1))
    code_C = tree.code_P[d][child_C]
    logp_C = logp_QBV.reshape(q * b, -1)[row_C, code_C].to(torch.float64)
    score_C = score_QB.reshape(-1)[row_C] + logp_C
    if torch.isnan(score_C).any():
        raise ValueError(f"logprob_fn returned NaN for a valid code at depth {d}")
    return row_C, child_C, code_C, score_C, torch.div(row_C, b, rounding_mode="floor")


def _children(tree: PrefixTree, d: int, node_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every child at depth d of every beam (nodes of depth d - 1; the root at d = 0; -1 is
    padding, without children): (the beam's row in the flat (Q * B) block, the child node)."""
    if d == 0:
        n_top = tree.code_P[0].shape[0]
        start_R = torch.zeros_like(node_R)
        count_R = torch.full_like(node_R, n_top)
    else:
        off_P1 = tree.child_offsets_P1[d - 1]
        safe_R = node_R.clamp(min=0)
        start_R = off_P1[safe_R]
        count_R = torch.where(node_R >= 0, off_P1[safe_R + 1] - start_R, 0)
    total = int(count_R.sum())
    rows_R = torch.arange(node_R.shape[0], device=node_R.device)
    row_C = torch.repeat_interleave(rows_R, count_R, output_size=total)
    before_R = torch.cumsum(count_R, 0) - count_R  # candidates of the rows before each row
    child_C = start_R[row_C] + torch.arange(total, device=node_R.device) - before_R[row_C]
    return row_C, child_C


def _best_per_query(
    query_C: torch.Tensor, score_C: torch.Tensor, tie_C: torch.Tensor, n_queries: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The best `keep` candidates of every query by score, ties to the lower tie_C (distinct within
    a query): (their indices into the candidates, their query, their rank 0.., and the largest
    number kept by any query, at least 1). Candidates come grouped by query, in query order."""
    idx_C = _contenders(query_C, score_C, n_queries, keep)
    if idx_C is not None:
        query_C, score_C, tie_C = query_C[idx_C], score_C[idx_C], tie_C[idx_C]
    # lexicographic (query, -score, tie) by stable sorts, least significant key first
    order = torch.sort(tie_C, stable=True).indices
    order = order[torch.sort(-score_C[order], stable=True).indices]
    order = order[torch.sort(query_C[order], stable=True).indices]
    query_S = query_C[order]
    count_Q = torch.bincount(query_C, minlength=n_queries)
    start_Q = torch.cumsum(count_Q, 0) - count_Q
    rank_S = torch.arange(order.shape[0], device=order.device) - start_Q[query_S]
    kept = rank_S < keep
    width = max(1, min(keep, int(count_Q.max())))
    sel_S = order[kept] if idx_C is None else idx_C[order[kept]]
    return sel_S, query_S[kept], rank_S[kept], width


def _contenders(
    query_C: torch.Tensor, score_C: torch.Tensor, n_queries: int, keep: int
) -> torch.Tensor | None:
    """The candidates that can be among their query's best `keep` (those scoring at least the
    query's keep-th best score, ties included), or None when there are too few to be worth it.
    Sorting is the search's cost, and a beam with many children (one token per item: the whole
    catalog) can offer far more candidates than are kept; a top-k over a dense (Q, widest query)
    block is much cheaper than the stable sorts, and leaves them a few per query."""
    count_Q = torch.bincount(query_C, minlength=n_queries)
    widest = int(count_Q.max())
    if widest <= keep or query_C.shape[0] <= 4 * n_queries * keep:
        return None
    start_Q = torch.cumsum(count_Q, 0) - count_Q
    slot_C = torch.arange(query_C.shape[0], device=query_C.device) - start_Q[query_C]
    dense_QW = torch.full((n_queries, widest), -torch.inf, dtype=score_C.dtype, device=score_C.device)
    dense_QW[query_C, slot_C] = score_C
    # a query with fewer than keep candidates gets -inf here: all of its candidates stay
    kth_Q = torch.topk(dense_QW, keep, dim=1, sorted=False).values.min(dim=1).values
    return torch.nonzero(score_C >= kth_Q[query_C]).squeeze(1)


def _final(
    tree, query_C, item_C, score_C, n_queries: int, top_k: int, excl_key
) -> tuple[np.ndarray, np.ndarray]:
    """The last depth: drop excluded leaves, take each query's top_k items (padded)."""
    if excl_key is not None:
        keep_C = ~torch.isin(query_C * tree.n_items + item_C, excl_key)
        query_C, item_C, score_C = query_C[keep_C], item_C[keep_C], score_C[keep_C]
    sel_S, query_S, rank_S, _ = _best_per_query(query_C, score_C, item_C, n_queries, top_k)
    dev = item_C.device
    items_QK = torch.full((n_queries, top_k), -1, dtype=torch.long, device=dev)
    items_QK[query_S, rank_S] = item_C[sel_S]
    scores_QK = torch.full((n_queries, top_k), -torch.inf, dtype=torch.float64, device=dev)
    scores_QK[query_S, rank_S] = score_C[sel_S]
    return items_QK.cpu().numpy(), scores_QK.cpu().numpy()


def _exclusion_keys(n_items: int, n_queries: int, offsets_Q1, items) -> torch.Tensor | None:
    """The exclusion sets as one int64 key q * N + item per (query, item), or None when empty."""
    if (offsets_Q1 is None) != (items is None):
        raise ValueError("give both exclude_offsets_Q1 and exclude_items, or neither")
    if offsets_Q1 is None:
        return None
    offsets_Q1, items = np.asarray(offsets_Q1, np.int64), np.asarray(items)
    if offsets_Q1.shape != (n_queries + 1,) or offsets_Q1[0] != 0 or offsets_Q1[-1] != len(items):
        raise ValueError(f"exclude_offsets_Q1 must be ({n_queries + 1},), from 0 to len(exclude_items)")
    if (np.diff(offsets_Q1) < 0).any():
        raise ValueError("exclude_offsets_Q1 must be non-decreasing")
    if len(items) == 0:
        return None
    if items.dtype.kind not in "iu" or items.min() < 0 or items.max() >= n_items:
        raise ValueError(f"exclude_items must be item rows in 0..{n_items - 1}")
    query_E = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(offsets_Q1))
    return torch.from_numpy(query_E * n_items + items.astype(np.int64))
