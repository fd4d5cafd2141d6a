"""The two streaming passes over the catalog (Ray Data), and what the driver keeps of them.

Pass 1 (scan): validate every row, collect every ItemID (to count and find duplicates), and
keep a deterministic hash sample of embeddings for fitting.
Pass 2 (encode): every item through the tokenizer; the driver keeps ItemIDs, codes and the
reconstruction-error sums, never the N x D matrix.

How the passes use Ray Data, and why (measured on 1M x 768 on 2 cores, BENCHMARKS.md):
- The catalog is read by source.CatalogSource (a Ray Data datasource that streams parquet
  4,096 rows at a time; it says why not read_parquet) and the pass is one
  ``map_batches(fn, batch_size=None)``, which Ray Data fuses into the read task
  (``ReadCatalogSource->MapBatches``): decoded embeddings never enter the object store, only
  the small per-block results do. A batch size, a per-operator concurrency, or more output
  blocks than read tasks each keep the two operators apart, and then the raw 3 GB travels
  through the object store (a whole 1M run took 85 s and 3.45 GB, 1.28 GB of it in the object
  store, against 51 s and 2.4 GB fused).
- At most as many tasks at once as there are cores (a resource limit on the pass's own
  DataContext): a local Ray advertises more logical CPUs than cores, and extra tasks cost
  memory, not time (the 1M encode pass took 17-19 s with the limit at 2 or 4 CPUs).
- Every pass task sets numpy's OpenBLAS to the CPUs Ray gave it (semid_dist/blas.py): a worker
  loads OpenBLAS before Ray sets OMP_NUM_THREADS, and two tasks on two cores ran four spinning
  BLAS threads (the 1M encode pass: 20.4 s and 38.7 CPU-s, then 13.3 s and 21.6 CPU-s).
- About TASKS_PER_SLOT read tasks per task slot, each reading consecutive files
  (source.plan_units): Ray Data leaves ~0.3 s between one read task and the next on a worker;
  with a task per file, a scan pass on warm workers took 5.9-6.6 s instead of 4.5-5.9.
- Fewer read tasks than task slots (a file in one big row group): each task asks for the spare
  CPUs, the read and the map alike so that they stay fused, and its BLAS uses them (the 1M
  encode pass over one row group: 22.9-24.3 s on one core, 17.4-17.9 s on two).
- Blocks of one read batch (target_max_block_size): otherwise Ray Data merges a task's batches
  into blocks of up to 128 MB before the map sees them.
- The scan's sample is copied out of each result batch as it arrives (_SampleSink), so the
  object store never holds the whole sample next to the driver's copy.
- On GPUs (encode_pass_on_devices) the map is an actor pool instead, one actor per GPU holding
  the tokenizer there; actors cannot be fused with the read.
- The kmeans encoder ships to the tasks as numpy codebooks (math/nearest_np.py), so a worker
  that only reads and encodes never imports torch; a tiger tokenizer ships as is.
- Every block comes back as ONE row of flat arrays (``_result``), and a bad row is reported
  inside it: Ray Data wraps a UDF's exception and the message naming the ItemID would be lost.

Results do not depend on row order, sharding or the number of tasks: the sample is a hash of
ItemIDs, every row is encoded on its own, and the driver sorts by ItemID.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist import blas
from semid_dist import data as datalib
from semid_dist.errors import UserError, find_user_error
from semid_dist.math import sampling
from semid_dist.math.rows import take_rows_in_place

log = logging.getLogger("semid_dist")


@dataclass
class ScanResult:
    ids_N: np.ndarray  # every ItemID, in arrival order
    sample_ids_S: np.ndarray  # sorted by ItemID
    sample_SD: np.ndarray  # float32, rows match sample_ids_S


@dataclass
class EncodeResult:
    ids_N: np.ndarray  # sorted by ItemID
    codes_NL: np.ndarray  # rows match ids_N
    sq_err_sum: float
    sq_norm_sum: float
    fp_N: np.ndarray | None = None  # embedding fingerprints (uint64), rows match ids_N; nightly only


# --- running a block function over the catalog ----------------------------------------------


def parallelism() -> int:
    """How many tasks to run at once: the cluster's CPUs; on a single machine at most its cores
    (a local Ray advertises more logical CPUs than cores, and extra tasks only cost memory)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        cpus = min(cpus, os.cpu_count() or cpus)
    return max(1, cpus)


def _spare_cpus(tasks: int) -> int:
    """CPUs per task when a pass has fewer tasks than parallelism(): the slots shared out, at
    most one node's CPUs (a task runs on one node)."""
    import ray

    node = max((int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(parallelism() // max(1, tasks), node))


TASKS_PER_SLOT = 2  # read tasks per task slot (source.plan_units): few gaps, even ends
TASK_CPUS = "semid_dist.task_cpus"  # a pass's CPUs per task, on its dataset's DataContext (catalog)


def read_tasks() -> int:
    """How many read tasks a pass over the catalog is cut into (source.plan_units)."""
    return TASKS_PER_SLOT * parallelism()


def _lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """One result row's list column."""
    return pa.array([values], pa.list_(type_))


def _result(error: Exception | None = None, **cols) -> pa.Table:
    """One result row per block, with the error (or null): a bad row's message and ItemID, or
    a whole message naming the file (error_item -2)."""
    item = -1 if error is None else getattr(error, "item_id", -2)
    cols["error"] = pa.array([None if error is None else error.args[0]], pa.string())
    cols["error_item"] = pa.array([-1 if item is None else item], pa.int64())
    return pa.table(cols)


def _guarded(fn: Callable, empty: dict) -> Callable:
    """fn(block, **kw) -> dict of one-row columns; a RowError becomes an error row."""

    def run(block: pa.Table, **kw) -> pa.Table:
        blas.match_task()  # numpy's BLAS threads as Ray allotted (semid_dist/blas.py)
        if "error" in block.column_names:  # an unreadable file (source.read_unit)
            return _result(UserError(block.column("error")[0].as_py()), **empty)
        try:
            return _result(**fn(block, **kw))
        except datalib.RowError as e:
            return _result(e, **empty)

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


def catalog(
    info: datalib.InputInfo,
    endpoint_url: str,
    n_items: int,
    read_batch: int | None = None,
    limit_cpus: bool = True,
):
    """The first n_items rows of the catalog as a Ray Dataset (source.CatalogSource), in blocks
    of one read batch, whose passes run at most parallelism() tasks at once (unless
    limit_cpus is False). The settings go on this dataset's own DataContext (a copy made when
    it was created): datasets built elsewhere keep theirs."""
    import ray

    from semid_dist.source import READ_BATCH, CatalogSource

    src = CatalogSource(info, n_items, endpoint_url, read_batch or READ_BATCH, tasks=read_tasks())
    # Fewer read tasks than task slots (a catalog of one or two big row groups: a task cannot
    # split one): each task gets the spare CPUs, which its BLAS uses (blas.match_task). Read and
    # map must ask for the same CPUs, or Ray Data does not fuse them.
    task_cpus = _spare_cpus(len(src.units)) if limit_cpus else 1
    # One block stream per read task: more blocks would make Ray Data split each task's
    # output (SplitBlocks), which also stops it fusing the read with the pass's map.
    ds = ray.data.read_datasource(src, override_num_blocks=max(1, len(src.units)), num_cpus=task_cpus)
    ds.context.set_config(TASK_CPUS, task_cpus)
    if limit_cpus:
        opts = ds.context.execution_options
        opts.resource_limits = opts.resource_limits.copy(cpu=parallelism())
    # Blocks of one read batch: Ray Data would otherwise merge a task's read batches into
    # blocks of up to 128 MB before the map sees them (~40k rows of 768-d floats).
    ds.context.target_max_block_size = src.read_batch * src.row_bytes
    return ds


def map_catalog(
    ds,
    fn: Callable,
    empty: dict,
    what: str,
    total: int,
    info: datalib.InputInfo,
    endpoint_url: str,
    keep: Callable[[pa.Table], pa.Table] | None = None,
    **fn_kwargs,
) -> pa.Table:
    """fn over every block of ds (fused with the read), the result rows (or what keep makes of
    each batch of them) concatenated. The first bad row stops the pass with a one-line
    UserError that names its file."""
    return collect(map_blocks(ds, fn, empty, **fn_kwargs), what, total, info, endpoint_url, keep)


def map_blocks(ds, fn: Callable, empty: dict, **fn_kwargs):
    """ds.map_batches of fn (guarded) over every block, fused with the read: the same CPUs per
    task as the read tasks (catalog)."""
    return ds.map_batches(
        _guarded(fn, empty),
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        num_cpus=ds.context.get_config(TASK_CPUS, 1),
        fn_kwargs=fn_kwargs,
    )


def collect(
    mapped,
    what: str,
    total: int,
    info: datalib.InputInfo,
    endpoint_url: str,
    keep: Callable[[pa.Table], pa.Table] | None = None,
) -> pa.Table:
    """The result rows of a pass, concatenated, with progress in the log; the first error row
    stops the pass with a one-line UserError that names its file. With keep, what it returns
    for each batch is kept instead: a batch is a view into Ray's object store, which holds the
    block as long as any of its buffers is referenced."""
    parts, done, t0, last = [], 0, time.time(), time.time()
    try:
        for b in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            errors = b.column("error")
            if errors.null_count < len(errors):
                i = int(np.flatnonzero(~errors.is_null().to_numpy(zero_copy_only=False))[0])
                item = b.column("error_item")[i].as_py()
                if item == -2:
                    raise UserError(errors[i].as_py())
                raise datalib.RowError(errors[i].as_py(), None if item < 0 else item)
            done += int(pc.sum(pc.list_value_length(b.column("ids"))).as_py() or 0)
            parts.append(b if keep is None else keep(b))
            if time.time() - last > 10:
                last = time.time()
                log.info("%s: %d / %d items (%.0f items/s)", what, done, total, done / max(last - t0, 1e-9))
    except Exception as e:
        err = find_user_error(e)
        if isinstance(err, datalib.RowError):
            raise datalib.with_file(err, info.files, endpoint_url) from None
        if err is not None:
            raise err from None
        raise
    if not parts:
        raise UserError(f"{info.files[0] if len(info.files) == 1 else 'input'}: zero rows")
    return pa.concat_tables(parts)


def flat(t: pa.Table, name: str) -> np.ndarray:
    return pc.list_flatten(t.column(name)).to_numpy(zero_copy_only=False)


def total(t: pa.Table, name: str) -> float:
    return float(pc.sum(t.column(name)).as_py() or 0.0)


def sq_norms(x_ND: np.ndarray) -> float:
    """sum ||x||^2: per row in float32 (a few hundred terms), over rows in float64."""
    return float(np.einsum("nd,nd->n", x_ND, x_ND).sum(dtype=np.float64))


# --- pass 1: scan ----------------------------------------------------------------------------

_EMPTY_SCAN = {
    "ids": _lists(np.zeros(0, np.int64), pa.int64()),
    "sample_ids": _lists(np.zeros(0, np.int64), pa.int64()),
    "sample": _lists(np.zeros(0, np.float32), pa.float32()),
}


def _scan_block(block: pa.Table, dim: int, seed: int, fraction: float) -> dict:
    ids_N, x_ND = datalib.batch_to_arrays(block, dim)
    keep = datalib.hash_unit(ids_N, seed) < fraction
    return {
        "ids": _lists(ids_N, pa.int64()),
        "sample_ids": _lists(ids_N[keep], pa.int64()),
        "sample": _lists(x_ND[keep].ravel(), pa.float32()),
    }


def scan_pass(
    info: datalib.InputInfo, seed: int, sample_size: int, endpoint_url: str, n_items: int
) -> ScanResult:
    """Pass 1 over the first n_items rows, in file order."""
    fraction = min(1.0, sample_size / max(n_items, 1))
    sink = _SampleSink(info.dim, n_items if fraction >= 1 else sampling.capacity(sample_size))
    t = map_catalog(
        catalog(info, endpoint_url, n_items),
        _scan_block,
        _EMPTY_SCAN,
        "scan",
        n_items,
        info,
        endpoint_url,
        keep=sink.take,
        dim=info.dim,
        seed=seed,
        fraction=fraction,
    )
    ids_N = flat(t, "ids").astype(np.int64, copy=False)
    sample_ids = flat(t, "sample_ids").astype(np.int64, copy=False)
    order = np.argsort(sample_ids, kind="stable")
    return ScanResult(ids_N=ids_N, sample_ids_S=sample_ids[order], sample_SD=sink.sorted(order))


class _SampleSink:
    """The scan's sample rows, copied out of each result batch as it arrives (the batch is then
    dropped and Ray frees its block) into one array, sorted by ItemID in place at the end.

    Keeping the batches until the pass ended held the whole sample in Ray's object store while
    the driver made its own sorted copy: for a 1 GB sample (325,147 x 768), 1.0 GB in the
    object store next to the driver's 1 GB (BENCHMARKS.md)."""

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
        return pa.table(
            {
                "ids": _lists(flat(b, "ids").copy(), pa.int64()),
                "sample_ids": _lists(flat(b, "sample_ids").copy(), pa.int64()),
            }
        )

    def sorted(self, order: np.ndarray) -> np.ndarray:
        assert len(order) == self.n, (len(order), self.n)
        rows = self.rows[: self.n]
        take_rows_in_place(rows, order)
        return rows


def check_unique_ids(ids_N: np.ndarray, files: list[str], endpoint_url: str) -> None:
    if ids_N.size == 0:
        raise UserError(f"{files[0] if len(files) == 1 else 'input'}: zero rows")
    s = np.sort(ids_N)
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        item = int(s[dup[0]])
        where = datalib.locate_item(files, item, endpoint_url) or "input"
        raise UserError(f"{where}: duplicate ItemID {item} ({dup.size} duplicate row(s) in the catalog)")


# --- pass 2: encode --------------------------------------------------------------------------


def encoder_of(tokenizer):
    """What the tasks get: a kmeans tokenizer as its numpy codebooks (no torch in the workers,
    the same kernel as Tokenizer.encode on CPU), a tiger tokenizer as is."""
    if tokenizer.mode == "kmeans":
        return tokenizer.codebooks_LKD.detach().cpu().float().contiguous().numpy()
    return tokenizer


def encode_rows(encoder, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) and squared reconstruction error per row."""
    if isinstance(encoder, np.ndarray):
        from semid_dist.math.nearest_np import residual_encode_np

        return residual_encode_np(x_ND, encoder, out_resid=False)
    return encoder.encode_with_error(x_ND)


def empty_encode(fingerprints: bool = False) -> dict:
    """The columns of an encode result row with no items (what an error row carries)."""
    out = {
        "ids": _lists(np.zeros(0, np.int64), pa.int64()),
        "codes": _lists(np.zeros(0, np.int32), pa.int32()),
        "sq_err": [0.0],
        "sq_norm": [0.0],
    }
    if fingerprints:
        out["fp"] = _lists(np.zeros(0, np.uint64), pa.uint64())
    return out


def encode_block(block: pa.Table, dim: int, encoder, fingerprints: bool = False) -> dict:
    """Codes of a block's items, their squared errors and norms summed, and with fingerprints
    the 64-bit fingerprint of every embedding (the nightly job's change detection)."""
    ids_N, x_ND = datalib.batch_to_arrays(block, dim)
    codes_NL, sq_err_N = encode_rows(encoder, x_ND)
    out = {
        "ids": _lists(ids_N, pa.int64()),
        "codes": _lists(codes_NL.astype(np.int32).ravel(), pa.int32()),
        "sq_err": [float(np.asarray(sq_err_N).sum(dtype=np.float64))],
        "sq_norm": [sq_norms(x_ND)],
    }
    if fingerprints:
        from semid_dist.math.generations import embedding_fingerprints

        out["fp"] = _lists(embedding_fingerprints(x_ND), pa.uint64())
    return out


def _encode_result(t: pa.Table, n_layers: int) -> EncodeResult:
    ids_N = flat(t, "ids").astype(np.int64, copy=False)
    codes_NL = flat(t, "codes").astype(np.int64).reshape(-1, n_layers)
    order = np.argsort(ids_N, kind="stable")
    fp_N = flat(t, "fp").astype(np.uint64, copy=False)[order] if "fp" in t.column_names else None
    return EncodeResult(
        ids_N=ids_N[order],
        codes_NL=codes_NL[order],
        sq_err_sum=total(t, "sq_err"),
        sq_norm_sum=total(t, "sq_norm"),
        fp_N=fp_N,
    )


def encode_pass(
    info: datalib.InputInfo, tokenizer, endpoint_url: str, n_items: int, fingerprints: bool = False
) -> EncodeResult:
    """Pass 2 over the first n_items rows: codes of every item (and with fingerprints their
    embedding fingerprints), sorted by ItemID."""
    t = map_catalog(
        catalog(info, endpoint_url, n_items),
        encode_block,
        empty_encode(fingerprints),
        "encode",
        n_items,
        info,
        endpoint_url,
        dim=info.dim,
        encoder=encoder_of(tokenizer),
        fingerprints=fingerprints,
    )
    return _encode_result(t, tokenizer.n_layers)


# --- encode on GPUs: an actor pool that holds the tokenizer on its device --------------------


class _DeviceEncoder:
    """Ray Data actor for the encode pass on an accelerator: the tokenizer (kmeans codebooks or
    the RQ-VAE) moves to the device once; each batch is encoded there in one call."""

    def __init__(self, tokenizer, dim: int, device: str, fingerprints: bool = False):
        self.tokenizer, self.dim = tokenizer.to(device), dim
        self.encode = _guarded(encode_block, empty_encode(fingerprints))
        self.fingerprints = fingerprints

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encode(batch, dim=self.dim, encoder=self.tokenizer, fingerprints=self.fingerprints)


def encode_device(cfg_device: str) -> tuple[str, int]:
    """Where the encode pass (and kmeans_mode.fit) runs: ("cuda", number of GPUs in the Ray
    cluster) when --device is cuda, or auto and the cluster has GPUs; else ("cpu", 0). GPUs are
    counted in the cluster, not on the driver (under `ray job submit` the driver often runs on a
    CPU-only head)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg_device == "cuda" and gpus == 0:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    if cfg_device != "cpu" and gpus > 0:
        return "cuda", gpus
    return "cpu", 0


def encode_pass_on_devices(
    info: datalib.InputInfo,
    tokenizer,
    endpoint_url: str,
    n_items: int,
    device: str,
    actors: int,
    batch_size: int,
    fingerprints: bool = False,
) -> EncodeResult:
    """The encode pass with `actors` actors (one GPU each when device is cuda) that hold the
    tokenizer on the device. Not fused with the read (actors cannot be): the read tasks' blocks
    reach the actors through the object store, which GPU nodes have room for."""
    ds = catalog(info, endpoint_url, n_items, limit_cpus=False)  # every CPU reads for the GPUs
    mapped = ds.map_batches(
        _DeviceEncoder,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "dim": info.dim,
            "device": device,
            "fingerprints": fingerprints,
        },
        concurrency=actors,
        num_gpus=1 if device == "cuda" else 0,
    )
    log.info("encode: %d actor(s) on %s, batches of %d", actors, device, batch_size)
    return _encode_result(collect(mapped, "encode", n_items, info, endpoint_url), tokenizer.n_layers)


def encode_catalog(
    info: datalib.InputInfo,
    tokenizer,
    endpoint_url: str,
    n_items: int,
    where: tuple[str, int],
    batch_size: int,
    fingerprints: bool = False,
) -> EncodeResult:
    """The encode pass where encode_device() said: actors on the GPUs, else the fused CPU pass."""
    device, gpus = where
    if device == "cuda":
        return encode_pass_on_devices(
            info, tokenizer, endpoint_url, n_items, device, gpus, batch_size, fingerprints
        )
    return encode_pass(info, tokenizer, endpoint_url, n_items, fingerprints)
