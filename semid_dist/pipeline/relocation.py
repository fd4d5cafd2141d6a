"""The ``relocate`` collision policy in Ray tasks: the driver never holds the candidates.

The rule (math/relocate.py) decides each prefix (the first L-1 codes) on its own, so the catalog
splits into buckets of whole prefixes, and each bucket is relocated by one Ray task:

1. During the encode pass, ``CandidateSpool.take`` gets each result block the driver receives.
   It cuts the block's rows by bucket (a hash of the prefix), buffers the pieces, and puts them in
   Ray's object store about every ``FLUSH_BYTES``: the driver keeps object references, not the
   candidates (96 bytes per item with 16 of them), and Ray spills them to disk under pressure.
   It hands back the block without the candidate columns.
2. After the pass, ``CandidateSpool.relocate`` runs one task per bucket on that bucket's pieces,
   ``relocate()`` over them; a task returns only what changed: the rows that moved with their
   new last code, and the rows with a dedup code above 0.
3. The driver applies those to a copy of the codes. Rows are named by their place in the encode
   pass's result stream (``EncodeResult.stream_order`` maps them to the ItemID order).

The IDs equal ``relocate()`` over all rows at once for any number of buckets and any sharding:
a bucket holds whole prefixes, and within a bucket ``relocate()`` orders rows by ItemID only
relative to each other (string ItemIDs: by their bytes, as the driver's ranks do).

Driver memory beyond the ``suffix`` policy: the codes' copy, the stream order and its inverse
(about 22 bytes per item with 3 levels; 25 measured, BENCHMARKS.md), the buffer (``FLUSH_BYTES``),
a reference per piece and the changes, whatever the catalog's size; each task holds about
``task_rows`` rows. The nightly job also keeps, through ``hold`` (``NotStable``), the candidates
of the items that can need a fresh ID.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import pyarrow as pa

from semid_dist.catalog.plumbing import flat, flat_names, parallelism

log = logging.getLogger("semid_dist")

FLUSH_BYTES = 64 << 20  # the candidates the driver buffers before it puts them in the object store
_MIX = np.uint64(0x9E3779B97F4A7C15)


def prefix_buckets(codes_NL: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket of each row: a hash of its first L-1 codes, mod n_buckets (all 0 with one level:
    every item then shares the empty prefix)."""
    n, n_levels = codes_NL.shape
    if n_buckets == 1 or n_levels == 1:
        return np.zeros(n, np.int64)
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n_levels - 1):
            h = (h ^ codes_NL[:, j].astype(np.uint64)) * _MIX
            h ^= h >> np.uint64(29)
    return (h % np.uint64(n_buckets)).astype(np.int64)


class CandidateSpool:
    """Takes the encode pass's result blocks (``take``: ``encode_catalog``'s keep), keeps their
    candidates in the object store by bucket, and relocates each bucket in a Ray task (module
    docstring)."""

    CANDIDATE_COLUMNS = ("cand", "cand_err")

    @classmethod
    def of(cls, cfg, extras, n_levels: int, strings: bool, n_items: int, hold=None) -> CandidateSpool | None:
        """The spool for a run's encode pass: one when the pass emits candidates (relocate)."""
        if not extras.candidates:
            return None
        return cls(n_items, n_levels, extras.candidates, strings, cfg.relocate_task_rows, hold)

    def __init__(
        self,
        n_items: int,
        n_levels: int,
        k: int,
        strings: bool,
        task_rows: int,
        hold: Callable[[pa.Table], np.ndarray] | None = None,
    ) -> None:
        """hold: which rows of a result block the driver keeps the candidates of as well (the
        nightly job: the rows that may need a fresh ID)."""
        self.n_levels, self.k, self.strings, self.hold = n_levels, k, strings, hold
        self.held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # stream rows, cand, err
        self.n_buckets = 1 if n_levels == 1 else max(1, math.ceil(n_items / max(1, task_rows)))
        self.refs: list[list] = [[] for _ in range(self.n_buckets)]
        self.buffers: list[list[dict]] = [[] for _ in range(self.n_buckets)]  # pieces not yet put
        self.buffered = 0  # their bytes
        self.rows = 0  # result rows seen: the next block's first stream row

    def take(self, b: pa.Table) -> pa.Table:
        """Spool a result block's candidates; return the block without them, in memory of its
        own (a view would keep the whole block, candidates included, in the object store)."""
        codes = flat(b, "codes").reshape(-1, self.n_levels)
        n = codes.shape[0]
        piece = {
            "row": np.arange(self.rows, self.rows + n, dtype=np.int64),
            "codes": codes,
            "cand": flat(b, "cand").reshape(n, self.k),
            "err": flat(b, "cand_err").reshape(n, self.k),
        }
        piece["order"] = flat_names(b) if self.strings else flat(b, "ids").astype(np.int64, copy=False)
        self.rows += n
        if self.hold is not None:
            h = np.flatnonzero(self.hold(b))
            self.held.append((piece["row"][h], piece["cand"][h], piece["err"][h]))
        bucket = prefix_buckets(codes, self.n_buckets)
        by_bucket = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[by_bucket], np.arange(self.n_buckets + 1))
        for q in range(self.n_buckets):
            rows = by_bucket[bounds[q] : bounds[q + 1]]
            if rows.size:
                part = {name: _take(col, rows) for name, col in piece.items()}
                self.buffers[q].append(part)
                self.buffered += sum(_nbytes(c) for c in part.values())
        if self.buffered >= FLUSH_BYTES:
            self.flush()
        kept = b.drop_columns(list(self.CANDIDATE_COLUMNS))
        return kept.take(pa.array(np.arange(len(kept))))  # take copies

    def flush(self) -> None:
        """Put every bucket's buffered pieces in the object store, one object per bucket."""
        import ray

        for q, parts in enumerate(self.buffers):
            if parts:
                self.refs[q].append(ray.put(_concat(parts)))
        self.buffers = [[] for _ in range(self.n_buckets)]
        self.buffered = 0

    def relocate(self, codes_NL: np.ndarray, stream_order: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Every bucket relocated in a Ray task; returns the codes after the policy and the dedup
        codes (rows of codes_NL, in ItemID order: row i is stream row stream_order[i]) and
        counts: moved, suffix_items, err_delta, tasks."""
        import ray

        self.flush()
        task = ray.remote(num_cpus=1)(relocate_bucket)
        waiting = [refs for refs in self.refs if refs]
        self.refs = [[] for _ in range(self.n_buckets)]  # a task holds its pieces until it ends
        row_of = _inverse(stream_order)
        new_codes = codes_NL.copy()
        dedup_N = np.zeros(len(codes_NL), np.int64)
        counts = {"moved": 0, "suffix_items": 0, "err_delta": 0.0, "tasks": len(waiting)}
        # at most parallelism() at once: a local Ray advertises more CPUs than cores, and each
        # task more would start a worker process of its own (the idle encode workers run these)
        window, running = parallelism(), []
        log.info("relocation: %d bucket(s) of prefixes, %d Ray task(s) at a time", len(waiting), window)
        while waiting or running:
            while waiting and len(running) < window:
                running.append(task.remote(*waiting.pop()))
            done, running = ray.wait(running, num_returns=1)
            r = ray.get(done[0])
            new_codes[row_of[r["moved_rows"]], -1] = r["moved_codes"]
            dedup_N[row_of[r["dedup_rows"]]] = r["dedup"]
            counts["moved"] += int(r["moved_rows"].size)
            counts["suffix_items"] += int(r["dedup_rows"].size)
            counts["err_delta"] += float(r["err_delta"])
        return new_codes, dedup_N, counts

    def held_candidates(self, stream_order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows hold() chose, in ItemID order (rows of the encode result), and their
        candidates and errors."""
        row_of = _inverse(stream_order)
        rows = row_of[np.concatenate([h[0] for h in self.held])] if self.held else np.zeros(0, np.int64)
        o = np.argsort(rows)
        cand = np.concatenate([h[1] for h in self.held]) if self.held else np.zeros((0, self.k), np.uint16)
        err = np.concatenate([h[2] for h in self.held]) if self.held else np.zeros((0, self.k), np.float32)
        self.held = []
        return rows[o], cand[o], err[o]

    def relocated(self, codes_NL: np.ndarray, stream_order: np.ndarray):
        """For the nightly job: the relocation in tasks and the held candidates, as
        math.generations.Relocated."""
        from semid_dist.math.generations import Relocated

        codes, dedup, _ = self.relocate(codes_NL, stream_order)
        return Relocated(codes, dedup, *self.held_candidates(stream_order))


class NotStable:
    """The nightly job's hold: the rows of a result block that are not stable against the
    previous generation (an ItemID it lacks, or another embedding fingerprint); only those can
    need a fresh ID. ids: the previous ItemIDs (sorted integers), or names: its string ItemIDs,
    looked up by their keys and then compared (two names with one key are never taken as one)."""

    def __init__(self, ids: np.ndarray, fp: np.ndarray, names: pa.Array | None = None) -> None:
        self.fp, self.names, self.perm = fp, names, None
        self.keys = ids
        if names is not None:
            from semid_dist.catalog.schema import id_keys

            keys = id_keys(names)
            self.perm = np.argsort(keys, kind="stable")
            self.keys = keys[self.perm]

    def __call__(self, b: pa.Table) -> np.ndarray:
        keys = flat(b, "ids").astype(np.int64, copy=False)
        if not len(self.keys):
            return np.ones(len(keys), bool)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        pos = at if self.perm is None else self.perm[at]
        stable = (self.keys[at] == keys) & (self.fp[pos] == flat(b, "fp"))
        if self.names is not None and stable.any():
            import pyarrow.compute as pc

            rows = np.flatnonzero(stable)
            same = pc.equal(flat_names(b).take(pa.array(rows)), self.names.take(pa.array(pos[rows])))
            stable[rows] = same.to_numpy(zero_copy_only=False)
        return ~stable


def relocate_bucket(*pieces: dict) -> dict:
    """A Ray task: ``relocate()`` over one bucket's rows; returns what changed, by stream row."""
    from semid_dist.catalog.plumbing import trim_heap
    from semid_dist.math.relocate import relocate

    trim_heap()  # a worker that ran an earlier pass holds its freed heap

    p = _concat(list(pieces))
    order = p["order"]
    if isinstance(order, (pa.Array, pa.ChunkedArray)):  # string ItemIDs: their ranks in the bucket
        import pyarrow.compute as pc

        ranks = np.empty(len(order), np.int64)
        ranks[pc.sort_indices(order).to_numpy()] = np.arange(len(order))
        order = ranks
    rel = relocate(order, p["codes"], p["cand"], p["err"])
    del p["cand"], p["err"], pieces
    moved = np.flatnonzero(rel.moved_N)
    suffix = np.flatnonzero(rel.dedup_N > 0)
    out = {
        "moved_rows": p["row"][moved],
        "moved_codes": rel.codes_NL[moved, -1],
        "dedup_rows": p["row"][suffix],
        "dedup": rel.dedup_N[suffix],
        "err_delta": rel.err_delta,
    }
    del rel
    trim_heap()  # the next task, or an idle worker, starts small
    return out


def _inverse(stream_order: np.ndarray) -> np.ndarray:
    """The row (ItemID order) of each stream row."""
    row_of = np.empty(len(stream_order), np.int64)
    row_of[stream_order] = np.arange(len(stream_order))
    return row_of


def _take(col, rows: np.ndarray):
    return col.take(pa.array(rows)) if isinstance(col, pa.Array) else col[rows]


def _nbytes(col) -> int:
    return col.nbytes if isinstance(col, (np.ndarray, pa.Array)) else 0


def _concat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name, first in parts[0].items():
        cols = [p[name] for p in parts]
        out[name] = pa.concat_arrays(cols) if isinstance(first, pa.Array) else np.concatenate(cols)
    return out
