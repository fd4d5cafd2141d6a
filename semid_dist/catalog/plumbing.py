"""Running a block function over the catalog with Ray Data, and collecting its small results.

The rules every pass follows (the reasons are in docs/architecture.md, the figures in
BENCHMARKS.md):
- The catalog is read by ``source.CatalogSource`` and the pass is one
  ``map_batches(fn, batch_size=None)``, which Ray Data fuses into the read task: decoded
  embeddings never enter the object store, only the small per-block results do. A batch size,
  a per-operator concurrency, or more output blocks than read tasks each keep the two operators
  apart, and then the raw embeddings travel through the object store.
- At most ``parallelism()`` tasks at once (a resource limit on the pass's own DataContext): a
  local Ray advertises more logical CPUs than cores, and extra tasks cost memory, not time.
- About ``TASKS_PER_SLOT`` read tasks per task slot (``source.plan_units``): Ray Data leaves a
  gap between one read task and the next on a worker, so one task per small file wastes time.
- Fewer read tasks than task slots (a file in one big row group): each task asks for the spare
  CPUs, the read and the map alike so that they stay fused, and its BLAS uses them.
- Every task sets numpy's OpenBLAS threads to the CPUs Ray gave it (``semid_dist.blas``).
- Blocks of one read batch: Ray Data would otherwise merge a task's batches into blocks of up to
  128 MB before the map sees them.
- Every block comes back as ONE row of flat arrays (``result_row``), and a bad row is reported
  inside it: Ray Data wraps a UDF's exception, and the message naming the ItemID would be lost.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist import blas, testhooks
from semid_dist.catalog.schema import Catalog, RowError
from semid_dist.errors import UserError, find_user_error

log = logging.getLogger("semid_dist")

TASKS_PER_SLOT = 2  # read tasks per task slot (source.plan_units): few gaps, even ends
TASK_CPUS = "semid_dist.task_cpus"  # a pass's CPUs per task, on its dataset's DataContext
PROGRESS_EVERY_S = 10  # a progress line in the log at most this often


def parallelism() -> int:
    """How many tasks to run at once: the cluster's CPUs; on a single machine at most its cores
    (a local Ray advertises more logical CPUs than cores, and extra tasks only cost memory)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        cpus = min(cpus, os.cpu_count() or cpus)
    return max(1, cpus)


def read_tasks() -> int:
    """How many read tasks a pass over the catalog is cut into (source.plan_units)."""
    return TASKS_PER_SLOT * parallelism()


def _spare_cpus(tasks: int) -> int:
    """CPUs per task when a pass has fewer tasks than parallelism(): the slots shared out, at
    most one node's CPUs (a task runs on one node)."""
    import ray

    node = max((int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)
    return max(1, min(parallelism() // max(1, tasks), node))


def lists(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """One result row's list column."""
    return pa.array([values], pa.list_(type_))


def name_lists(names: pa.Array | None = None) -> pa.Array:
    """One result row's list column of string ItemIDs (large_string; none: an empty row)."""
    names = pa.array([], pa.large_string()) if names is None else names.cast(pa.large_string())
    return pa.LargeListArray.from_arrays(pa.array([0, len(names)], pa.int64()), names)


def flat_names(t: pa.Table, name: str = "names") -> pa.Array:
    """A list column of string ItemIDs over result rows, as one large_string array."""
    out = pc.list_flatten(t.column(name))
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def result_row(error: Exception | None = None, **cols) -> pa.Table:
    """One result row per block, with the error (or null): a bad row's message and ItemID, or
    a whole message naming the file (error_item -2)."""
    item = -1 if error is None else getattr(error, "item_id", -2)
    cols["error"] = pa.array([None if error is None else error.args[0]], pa.string())
    cols["error_item"] = pa.array([-1 if item is None else item], pa.int64())
    return pa.table(cols)


TRIM_EVERY_S = 2.0  # a pass's worker hands its freed heap back to the OS at most this often
_last_trim = [0.0]


def trim_heap(every_s: float = 0.0) -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim, a no-op elsewhere; and what
    Arrow's memory pool keeps). Both keep what numpy and Arrow free for reuse, so a process's
    RSS stays at its high-water mark: the idle Ray workers of a finished pass, and the driver
    between stages, would otherwise hold hundreds of MB at catalog scale (BENCHMARKS.md)."""
    now = time.monotonic()
    if now - _last_trim[0] < every_s:
        return
    _last_trim[0] = now
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def guarded(fn: Callable, empty: dict) -> Callable:
    """fn(block, **kw) -> dict of one-row columns; a RowError becomes an error row."""

    def run(block: pa.Table, **kw) -> pa.Table:
        trim_heap(TRIM_EVERY_S)
        blas.match_task()  # numpy's BLAS threads as Ray allotted
        testhooks.hold(fn.__name__)  # a no-op unless a test holds this pass
        if "error" in block.column_names:  # an unreadable file (source.read_unit)
            return result_row(UserError(block.column("error")[0].as_py()), **empty)
        try:
            out = fn(block, **kw)
        except RowError as e:
            return result_row(e, **empty)
        trim_heap(TRIM_EVERY_S)  # fn's temporaries (a worker's last block would keep them)
        return result_row(**out)

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    return run


def dataset(catalog: Catalog, n_items: int, read_batch: int | None = None, limit_cpus: bool = True):
    """The first n_items rows of the catalog as a Ray Dataset (source.CatalogSource), in blocks
    of one read batch, whose passes run at most parallelism() tasks at once (unless
    limit_cpus is False). The settings go on this dataset's own DataContext (a copy made when
    it was created): datasets built elsewhere keep theirs."""
    import ray

    from semid_dist.catalog.source import READ_BATCH, CatalogSource

    src = CatalogSource(catalog, n_items, read_batch or READ_BATCH, tasks=read_tasks())
    # Read and map must ask for the same CPUs, or Ray Data does not fuse them.
    task_cpus = _spare_cpus(len(src.units)) if limit_cpus else 1
    # One block stream per read task: more blocks would make Ray Data split each task's
    # output (SplitBlocks), which also stops it fusing the read with the pass's map.
    ds = ray.data.read_datasource(src, override_num_blocks=max(1, len(src.units)), num_cpus=task_cpus)
    ds.context.set_config(TASK_CPUS, task_cpus)
    if limit_cpus:
        opts = ds.context.execution_options
        opts.resource_limits = opts.resource_limits.copy(cpu=parallelism())
    ds.context.target_max_block_size = src.read_batch * src.row_bytes
    return ds


def map_blocks(ds, fn: Callable, empty: dict, **fn_kwargs):
    """ds.map_batches of fn (guarded) over every block, fused with the read: the same CPUs per
    task as the read tasks (dataset())."""
    return ds.map_batches(
        guarded(fn, empty),
        batch_format="pyarrow",
        batch_size=None,
        zero_copy_batch=True,
        num_cpus=ds.context.get_config(TASK_CPUS, 1),
        fn_kwargs=fn_kwargs,
    )


def map_catalog(
    ds,
    fn: Callable,
    empty: dict,
    what: str,
    total: int,
    catalog: Catalog,
    keep: Callable[[pa.Table], pa.Table] | None = None,
    **fn_kwargs,
) -> pa.Table:
    """fn over every block of ds (fused with the read), the result rows (or what keep makes of
    each batch of them) concatenated. The first bad row stops the pass with a one-line
    UserError that names its file."""
    return collect(map_blocks(ds, fn, empty, **fn_kwargs), what, total, catalog, keep)


def collect(
    mapped, what: str, total: int, catalog: Catalog, keep: Callable[[pa.Table], pa.Table] | None = None
) -> pa.Table:
    """The result rows of a pass, concatenated, with progress in the log; the first error row
    stops the pass with a one-line UserError that names its file. With keep, what it returns
    for each batch is kept instead: a batch is a view into Ray's object store, which holds the
    block as long as any of its buffers is referenced."""
    parts, progress = [], Progress(what, total)
    try:
        for b in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            errors = b.column("error")
            if errors.null_count < len(errors):
                i = int(np.flatnonzero(~errors.is_null().to_numpy(zero_copy_only=False))[0])
                item = b.column("error_item")[i].as_py()
                if item == -2:
                    raise UserError(errors[i].as_py())
                raise RowError(errors[i].as_py(), None if item < 0 else item)
            progress.add(int(pc.sum(pc.list_value_length(b.column("ids"))).as_py() or 0))
            parts.append(b if keep is None else keep(b))
    except Exception as e:
        raise_for_user(e, catalog)
        raise
    if not parts:
        raise UserError(f"{catalog.name}: zero rows")
    return pa.concat_tables(parts)


class Progress:
    """A pass's progress in the log, at most every PROGRESS_EVERY_S seconds."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.t0 = self.last = time.time()

    def add(self, items: int) -> None:
        self.done += items
        if time.time() - self.last > PROGRESS_EVERY_S:
            self.last = time.time()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info("%s: %d / %d items (%.0f items/s)", self.what, self.done, self.total, rate)


def raise_for_user(e: BaseException, catalog: Catalog) -> None:
    """If a pass failed on something the user can fix, raise that as a one-line UserError: a bad
    row's message gets the name of the file holding its ItemID. Otherwise return (the caller
    re-raises the original)."""
    err = find_user_error(e)
    if isinstance(err, RowError):
        raise catalog.with_file(err) from None
    if err is not None:
        raise err from None


def flat(t: pa.Table, name: str) -> np.ndarray:
    """A list column of result rows as one flat array."""
    return pc.list_flatten(t.column(name)).to_numpy(zero_copy_only=False)


def total(t: pa.Table, name: str) -> float:
    return float(pc.sum(t.column(name)).as_py() or 0.0)
