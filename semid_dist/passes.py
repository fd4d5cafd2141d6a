"""The two streaming passes over the catalog (Ray Data), and what the driver keeps of them.

Pass 1 (scan): validate every row, collect every ItemID (to count and find duplicates), and
keep a deterministic hash sample of embeddings for fitting.
Pass 2 (encode): every item through the tokenizer; the driver keeps ItemIDs, codes and the
reconstruction-error sums, never the N x D matrix.

Each batch comes back as ONE row of flat arrays (ids, codes, sample), which keeps Ray Data's
per-row overhead out of the way.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semid_dist import data as datalib
from semid_dist.errors import UserError

log = logging.getLogger("semid_dist")


@dataclass
class ScanResult:
    ids_N: np.ndarray  # every ItemID, in arrival order
    sample_ids_S: np.ndarray  # sorted by ItemID
    sample_SD: np.ndarray  # float32, rows match sample_ids_S
    sq_norm_sum: float


@dataclass
class EncodeResult:
    ids_N: np.ndarray  # sorted by ItemID
    codes_NL: np.ndarray  # rows match ids_N
    sq_err_sum: float
    sq_norm_sum: float


def _result(error: datalib.RowError | None = None, **cols) -> pa.Table:
    """One result row per batch. A bad row is reported IN the result, not raised: Ray Data
    wraps exceptions from a UDF into a generic UserCodeException and the original message
    (which names the ItemID) would be lost."""
    cols["error"] = pa.array([None if error is None else error.args[0]], pa.string())
    cols["error_item"] = pa.array([-1 if error is None or error.item_id is None else error.item_id],
                                  pa.int64())
    return pa.table(cols)


def _scan_batch(batch: pa.Table, dim: int, seed: int, fraction: float) -> pa.Table:
    try:
        ids_N, x_ND = datalib.batch_to_arrays(batch, dim)
    except datalib.RowError as e:
        ids_N, x_ND = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return _result(e, ids=[ids_N], sample_ids=[ids_N], sample=[x_ND.ravel()], sq_norm=[0.0])
    keep = datalib.hash_unit(ids_N, seed) < fraction
    return _result(
        ids=[ids_N],
        sample_ids=[ids_N[keep]],
        sample=[np.ascontiguousarray(x_ND[keep]).ravel()],
        sq_norm=[float(np.einsum("nd,nd->", x_ND, x_ND, dtype=np.float64))],
    )


def _collect(ds, what: str, total: int):
    """Iterate result rows, logging progress; re-raise row errors with their file named."""
    done, t0, last = 0, time.time(), 0.0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in _rows(batch):
            if row["error"] is not None:
                item = row["error_item"]
                raise datalib.RowError(row["error"], None if item < 0 else item)
            done += len(row["ids"])
            yield row
        now = time.time()
        if now - last > 10:
            log.info("%s: %d / %d items (%.0f items/s)", what, done, total, done / max(now - t0, 1e-9))
            last = now


def _rows(batch: pa.Table):
    cols = {name: batch.column(name) for name in batch.column_names}
    for i in range(batch.num_rows):
        row = {}
        for name, col in cols.items():
            v = col[i]
            row[name] = v.values.to_numpy(zero_copy_only=False) if isinstance(v, pa.ListScalar) else v.as_py()
        yield row


def _run(gen, files, endpoint_url):
    try:
        return list(gen)
    except Exception as e:
        from semid_dist.errors import find_user_error

        err = find_user_error(e)
        if isinstance(err, datalib.RowError):
            raise datalib.with_file(err, files, endpoint_url) from None
        if err is not None:
            raise err from None
        raise


def scan_pass(ds, info: datalib.InputInfo, seed: int, sample_size: int, endpoint_url: str,
              batch_size: int, n_items: int) -> ScanResult:
    fraction = min(1.0, sample_size / max(n_items, 1))
    mapped = ds.map_batches(_scan_batch, batch_format="pyarrow", batch_size=batch_size,
                            fn_kwargs={"dim": info.dim, "seed": seed, "fraction": fraction})
    rows = _run(_collect(mapped, "scan", n_items), info.files, endpoint_url)
    ids_N = np.concatenate([r["ids"] for r in rows]) if rows else np.zeros(0, np.int64)
    sample_ids = np.concatenate([r["sample_ids"] for r in rows]).astype(np.int64)
    sample = np.concatenate([r["sample"] for r in rows]).astype(np.float32).reshape(-1, info.dim)
    order = np.argsort(sample_ids, kind="stable")
    return ScanResult(ids_N=ids_N.astype(np.int64), sample_ids_S=sample_ids[order],
                      sample_SD=sample[order], sq_norm_sum=float(sum(r["sq_norm"] for r in rows)))


def check_unique_ids(ids_N: np.ndarray, files: list[str], endpoint_url: str) -> None:
    if ids_N.size == 0:
        raise UserError(f"{files[0] if len(files) == 1 else 'input'}: zero rows")
    s = np.sort(ids_N)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        item = int(s[dup[0]])
        where = datalib.locate_item(files, item, endpoint_url) or "input"
        raise UserError(f"{where}: duplicate ItemID {item} ({dup.size} duplicate row(s) in the catalog)")


def _encode_batch(batch: pa.Table, tokenizer, dim: int) -> pa.Table:
    try:
        ids_N, x_ND = datalib.batch_to_arrays(batch, dim)
    except datalib.RowError as e:
        empty = np.zeros(0, np.int64)
        return _result(e, ids=[empty], codes=[empty.astype(np.int32)], sq_err=[0.0], sq_norm=[0.0])
    codes_NL, sq_err_N = tokenizer.encode_with_error(x_ND)
    return _result(
        ids=[ids_N],
        codes=[codes_NL.astype(np.int32).ravel()],
        sq_err=[float(sq_err_N.sum())],
        sq_norm=[float(np.einsum("nd,nd->", x_ND, x_ND, dtype=np.float64))],
    )


class _EncodeBatches:
    """Ray Data actor for the GPU path: moves the model to the device once."""

    def __init__(self, tokenizer, dim: int):
        self.tokenizer, self.dim = tokenizer.to("cuda"), dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _encode_batch(batch, self.tokenizer, self.dim)


def encode_pass(ds, info: datalib.InputInfo, tokenizer, endpoint_url: str, batch_size: int,
                n_items: int, num_gpus: float = 0, concurrency: int = 1) -> EncodeResult:
    """On CPU, plain tasks: Ray Data fuses them with the parquet read, so raw embeddings never
    cross the object store and no CPU is held by an idle actor (an actor pool that takes every
    CPU starves the read tasks and hangs). On GPU, a pool of actors that each hold the model."""
    if num_gpus:
        mapped = ds.map_batches(_EncodeBatches, batch_format="pyarrow", batch_size=batch_size,
                                fn_constructor_kwargs={"tokenizer": tokenizer, "dim": info.dim},
                                concurrency=concurrency, num_gpus=num_gpus)
    else:
        mapped = ds.map_batches(_encode_batch, batch_format="pyarrow", batch_size=batch_size,
                                fn_kwargs={"tokenizer": tokenizer, "dim": info.dim})
    rows = _run(_collect(mapped, "encode", n_items), info.files, endpoint_url)
    L = tokenizer.n_layers
    ids_N = np.concatenate([r["ids"] for r in rows]).astype(np.int64)
    codes_NL = np.concatenate([r["codes"] for r in rows]).astype(np.int64).reshape(-1, L)
    order = np.argsort(ids_N, kind="stable")
    return EncodeResult(ids_N=ids_N[order], codes_NL=codes_NL[order],
                        sq_err_sum=float(sum(r["sq_err"] for r in rows)),
                        sq_norm_sum=float(sum(r["sq_norm"] for r in rows)))
