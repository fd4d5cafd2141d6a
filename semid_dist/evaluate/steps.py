"""The retriever's epoch and its recommendations, written once for 1 and N workers.

No Ray and no I/O here: the worker (worker.py) hands in the windows, the queries and a
Collectives object; with one process every collective is the identity. Rules that make N
workers train what one worker trains (up to the order of float sums):

1. Global batches come from tiger/batches.py (a hash of each window's key, the seed and the
   epoch), so batch j holds the same windows for any number of workers; rank r takes every
   world-th window of it.
2. Each rank's loss is its summed cross-entropy divided by the global batch's number of
   targets, and the gradients are summed over ranks (one all-reduce of one flat buffer per
   step), which gives the gradient of the global batch's mean. A rank with no window in a batch
   still takes part, with zero gradients.
3. Validation hits are summed over ranks, so every rank takes the same early-stopping decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semid_dist.math.prefix_beam import PrefixTree, beam_search
from semid_dist.math.retrieval import hit_ranks
from semid_dist.math.retriever import Retriever
from semid_dist.tiger import batches
from semid_dist.tiger.collectives import Collectives

QUERY_CHUNK = 256  # queries decoded at a time: beam_size x this many prefixes per level
TOP_K = 10


@dataclass
class Windows:
    items_WS: np.ndarray  # item rows, -1 padded on the right
    target_WS: np.ndarray  # bool: positions whose item is a training target
    keys_W: np.ndarray  # int64: what the global batches hash


@dataclass
class Queries:
    target_Q: np.ndarray  # item row to retrieve
    context_QH: np.ndarray  # the items before it (at most max_history), left-aligned, -1 padded
    length_Q: np.ndarray
    seen_offsets_Q1: np.ndarray  # CSR of every item the user saw before the target
    seen_items: np.ndarray

    def take(self, rows: np.ndarray) -> Queries:
        """The queries at rows (their seen lists too)."""
        starts, ends = self.seen_offsets_Q1[rows], self.seen_offsets_Q1[rows + 1]
        lens = ends - starts
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        idx = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
        return Queries(
            self.target_Q[rows], self.context_QH[rows], self.length_Q[rows], offsets, self.seen_items[idx]
        )


def codes_of(sid_NM: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (..., M), valid (...)) of item rows, -1 for padding (its codes are row 0's)."""
    valid = items >= 0
    return sid_NM[items.clamp(min=0)], valid


def train_epoch(
    model: Retriever,
    opt: torch.optim.Optimizer,
    sid_NM: torch.Tensor,
    win: Windows,
    epoch: int,
    seed: int,
    batch_size: int,
    comm: Collectives,
) -> float:
    """One pass over the windows in global batches; the mean loss per target (all ranks)."""
    device = sid_NM.device
    nb = batches.num_batches(len(win.keys_W), batch_size)
    order_W, offsets = batches.group_rows(batches.epoch_batch_index(win.keys_W, seed, epoch, nb), nb)
    targets_W = win.target_WS.sum(axis=1)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, targets
    for j in range(nb):
        rows_B = order_W[offsets[j] : offsets[j + 1]]
        n_global = int(targets_W[rows_B].sum())
        if n_global == 0:  # no target in this batch on any rank: every rank skips it
            continue
        mine = rows_B[comm.rank :: comm.world]
        opt.zero_grad(set_to_none=True)
        if len(mine):
            items = torch.from_numpy(win.items_WS[mine]).to(device)
            codes, valid = codes_of(sid_NM, items)
            loss = model.loss(codes, valid, torch.from_numpy(win.target_WS[mine]).to(device))
            (loss / n_global).backward()
            total[0] += loss.detach().double()
        _sum_gradients(params, comm)
        opt.step()
    total[1] = float(targets_W.sum())
    comm.sum_(total[:1])
    return float(total[0] / max(total[1], 1.0))


def _sum_gradients(params: list[torch.nn.Parameter], comm: Collectives) -> None:
    """Gradients summed over ranks: one all-reduce of one flat buffer (a parameter a rank did
    not use this step counts as zero)."""
    if not comm.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.sum_(flat)
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at : at + n].view_as(p).clone()
        at += n


@torch.no_grad()
def recommend(
    model: Retriever,
    sid_NM: torch.Tensor,
    tree: PrefixTree,
    q: Queries,
    beam_size: int,
    keep_seen: bool,
    top_k: int = TOP_K,
) -> np.ndarray:
    """The top_k items (rows, best first, -1 padded) the model generates for each query: beam
    search over valid IDs only, the user's seen items dropped unless keep_seen."""
    model.eval()
    device = sid_NM.device
    out = np.full((len(q.target_Q), top_k), -1, np.int64)
    for lo in range(0, len(q.target_Q), QUERY_CHUNK):
        part = q.take(np.arange(lo, min(lo + QUERY_CHUNK, len(q.target_Q))))
        codes, valid = codes_of(sid_NM, torch.from_numpy(part.context_QH).to(device))
        h_QSD = model.encode_history(codes, valid)
        last = torch.from_numpy(part.length_Q - 1).to(device)
        h_QD = h_QSD[torch.arange(len(last), device=device), last]
        items, _ = beam_search(
            tree,
            lambda d, prefix, h=h_QD: model.next_logprobs(h, prefix),
            len(last),
            beam_size,
            top_k,
            exclude_offsets_Q1=None if keep_seen else part.seen_offsets_Q1,
            exclude_items=None if keep_seen else part.seen_items,
            device=device,
        )
        out[lo : lo + len(last)] = items
    return out


def ranks_on_rank(
    model: Retriever,
    sid_NM: torch.Tensor,
    tree: PrefixTree,
    q: Queries,
    beam_size: int,
    keep_seen: bool,
    comm: Collectives,
) -> np.ndarray:
    """Every query's rank of its target (1-based, 0: not in the top ten), computed by the ranks
    on every world-th query and gathered: the full array on every rank."""
    mine = np.arange(comm.rank, len(q.target_Q), comm.world)
    recs = recommend(model, sid_NM, tree, q.take(mine), beam_size, keep_seen)
    rank_Q = hit_ranks(recs, q.target_Q[mine])
    device = sid_NM.device
    both = torch.from_numpy(np.stack([mine, rank_Q], axis=1)).to(device)
    got = comm.gather_rows(both).cpu().numpy()
    out = np.zeros(len(q.target_Q), np.int64)
    out[got[:, 0]] = got[:, 1]
    return out
