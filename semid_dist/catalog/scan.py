"""The scan pass: validate every row, collect every ItemID, keep a hash sample for the fit.

The driver keeps the ItemIDs (to count them and find duplicates) and the sample, never the
N x D matrix. The sample is the rows whose ItemID hashes (with the seed) below target / N, so
the same catalog gives the same sample however it is sharded or ordered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.catalog import plumbing
from semid_dist.catalog.plumbing import flat, flat_names, lists, name_lists
from semid_dist.catalog.schema import Catalog, batch_names, batch_to_arrays
from semid_dist.math import sampling
from semid_dist.math.rows import take_rows_in_place


@dataclass
class ScanResult:
    ids_N: np.ndarray  # every ItemID key (schema.batch_to_arrays), in arrival order
    sample_ids_S: np.ndarray  # sorted by ItemID key
    sample_SD: np.ndarray  # float32, rows match sample_ids_S
    maxabs: float = float("nan")  # the largest |embedding value| (only when the scan was asked for it)
    names: pa.Array | None = None  # string ItemIDs, in arrival order (None: integer ItemIDs)

    def check_unique(self, catalog: Catalog) -> None:
        """No ItemID twice (string ItemIDs are compared as strings, not by their keys). The
        strings are let go then: the encode pass collects them again, sorted."""
        if self.names is None:
            catalog.check_unique_ids(self.ids_N)
        else:
            names, self.names = self.names, None
            catalog.check_unique_names(names.take(pc.sort_indices(names)))


def empty_scan(strings: bool) -> dict:
    out = {
        "ids": lists(np.zeros(0, np.int64), pa.int64()),
        "sample_ids": lists(np.zeros(0, np.int64), pa.int64()),
        "sample": lists(np.zeros(0, np.float32), pa.float32()),
        "maxabs": [0.0],
    }
    if strings:
        out["names"] = name_lists()
    return out


def scan_block(block: pa.Table, dim: int, seed: int, fraction: float, maxabs: bool = False) -> dict:
    """One block's ItemIDs (keys, and string ItemIDs as such), its rows that fall in the hash
    sample, and with maxabs its largest |value|."""
    ids_N, x_ND = batch_to_arrays(block, dim)
    keep = sampling.hash_unit(ids_N, seed) < fraction
    out = {
        "ids": lists(ids_N, pa.int64()),
        "sample_ids": lists(ids_N[keep], pa.int64()),
        "sample": lists(x_ND[keep].ravel(), pa.float32()),
        "maxabs": [float(np.abs(x_ND).max()) if maxabs and len(x_ND) else 0.0],
    }
    names = batch_names(block)
    if names is not None:
        out["names"] = name_lists(names)
    return out


def scan_pass(
    catalog: Catalog, seed: int, sample_size: int, n_items: int, maxabs: bool = False
) -> ScanResult:
    """The scan over the first n_items rows, in file order: every ItemID, a hash sample of about
    sample_size rows sorted by ItemID, and with maxabs the largest |value| of any embedding (the
    streamed fit's fixed-point scale needs it)."""
    fraction = min(1.0, sample_size / max(n_items, 1))
    sink = SampleSink(catalog.dim, n_items if fraction >= 1 else sampling.capacity(sample_size))
    t = plumbing.map_catalog(
        plumbing.dataset(catalog, n_items),
        scan_block,
        empty_scan(catalog.string_ids),
        "scan",
        n_items,
        catalog,
        keep=sink.take,
        dim=catalog.dim,
        seed=seed,
        fraction=fraction,
        maxabs=maxabs,
    )
    ids_N = flat(t, "ids").astype(np.int64, copy=False)
    sample_ids = flat(t, "sample_ids").astype(np.int64, copy=False)
    order = np.argsort(sample_ids, kind="stable")
    top = float(pc.max(t.column("maxabs")).as_py() or 0.0) if maxabs else float("nan")
    names = flat_names(t) if catalog.string_ids else None
    return ScanResult(
        ids_N=ids_N, sample_ids_S=sample_ids[order], sample_SD=sink.sorted(order), maxabs=top, names=names
    )


class SampleSink:
    """The scan's sample rows, copied out of each result batch as it arrives (the batch is then
    dropped and Ray frees its block) into one array, sorted by ItemID in place at the end.

    Keeping the batches until the pass ended would hold the whole sample in Ray's object store
    next to the driver's own sorted copy: twice the sample's memory."""

    def __init__(self, dim: int, capacity: int):
        self.rows = np.empty((max(capacity, 1), dim), np.float32)  # pages fault in as they fill
        self.n = 0

    def take(self, b: pa.Table) -> pa.Table:
        """Copy the batch's sample rows out; return its ItemIDs and sample ItemIDs as fresh
        arrays (views would keep the whole block alive)."""
        new = flat(b, "sample").reshape(-1, self.rows.shape[1])
        if self.n + len(new) > len(self.rows):  # past sampling.capacity: essentially never
            self.rows = np.concatenate(
                [self.rows[: self.n], np.empty((len(new) + self.n // 2, self.rows.shape[1]), np.float32)]
            )
        self.rows[self.n : self.n + len(new)] = new
        self.n += len(new)
        out = {
            "ids": lists(flat(b, "ids").copy(), pa.int64()),
            "sample_ids": lists(flat(b, "sample_ids").copy(), pa.int64()),
            "maxabs": [float(pc.max(b.column("maxabs")).as_py() or 0.0)],
        }
        if "names" in b.column_names:  # a fresh copy: a view would keep the whole block alive
            names = flat_names(b)
            out["names"] = name_lists(names.take(pa.array(np.arange(len(names)))))
        return pa.table(out)

    def sorted(self, order: np.ndarray) -> np.ndarray:
        assert len(order) == self.n, (len(order), self.n)
        rows = self.rows[: self.n]
        take_rows_in_place(rows, order)
        return rows
