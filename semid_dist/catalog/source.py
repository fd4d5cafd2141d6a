"""A Ray Data source for the catalog passes: parquet streamed a few thousand rows at a time.

Why not ``ray.data.read_parquet``: its reader pre-buffers whole column chunks and reads ahead,
which suits many narrow columns; our one column is hundreds of floats a row, so a 64k-row group
is a column chunk of hundreds of MB, and every read task held several of them (BENCHMARKS.md).
Here a task opens its file with a buffered stream and no pre-buffering, so pages decode as they
arrive and a task holds one READ_BATCH of rows at a time.

It is a plain ``ray.data.Datasource``: Ray Data schedules the read tasks, fuses them with the
pass's ``map_batches`` (so raw embeddings never enter the object store) and streams the small
results back. Pieces = one per file, big files split by row groups; a read task reads
consecutive pieces, about ``tasks`` tasks in all (plan_units says why not one task per file);
``--max_items`` is applied here (the first rows in file order), so no ``limit`` breaks the
fusion.

A file that cannot be read yields one block with a single ``error`` column instead of raising:
Ray Data wraps a task's exception and the message naming the file would be lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from semid_dist.catalog.schema import EMB_COL, ID_COL, SPLIT_ROWS, Catalog
from semid_dist.errors import one_line
from semid_dist.io.retry import SDK_RETRY_S, Backoff, TaskClock, is_transient, run_clock
from semid_dist.io.storage import strip_scheme

READ_BATCH = 4096  # rows per block (12 MB of 768-d float32)
READ_BUFFER = 4 << 20  # buffered column reads: pages decode as they stream in
ERROR_COL = "error"


@dataclass(frozen=True)
class Piece:
    path: str
    row_groups: tuple[int, ...] | None  # None: the whole file
    rows: int  # rows of the piece to use (the first `rows`; fewer than it has under --max_items)


@dataclass(frozen=True)
class Unit:
    """One read task: consecutive pieces, read in file order."""

    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.pieces))


def plan_pieces(catalog: Catalog, n_items: int) -> list[Piece]:
    """The first n_items rows in file order, as pieces: one per file, big files split by row group."""
    rows_per_file = catalog.rows_per_file or [catalog.open(p).metadata.num_rows for p in catalog.files]
    pieces, left = [], n_items
    for path, n in zip(catalog.files, rows_per_file, strict=True):
        if left <= 0:
            break
        take = min(n, left)
        left -= take
        if take == 0:
            continue
        if n <= SPLIT_ROWS:
            pieces.append(Piece(path, None, take))
            continue
        md = catalog.open(path).metadata
        group, group_rows = [], 0
        for rg in range(md.num_row_groups):
            if take <= 0:
                break
            rg_rows = min(md.row_group(rg).num_rows, take)
            group.append(rg)
            group_rows += rg_rows
            take -= rg_rows
            if group_rows >= SPLIT_ROWS // 2 or take <= 0:
                pieces.append(Piece(path, tuple(group), group_rows))
                group, group_rows = [], 0
    return pieces


def plan_units(catalog: Catalog, n_items: int, tasks: int | None = None) -> list[Unit]:
    """The read tasks for the first n_items rows: the pieces (plan_pieces) packed in file order
    into about `tasks` units of similar row counts (a piece is never cut); without `tasks`, one
    unit per piece.

    Why pack: Ray Data starts each read task a few tenths of a second after the last one on the
    same worker ended, and a catalog is often many small files: with one task per file those
    gaps add up in every pass."""
    pieces = plan_pieces(catalog, n_items)
    if not tasks or tasks >= len(pieces):
        return [Unit((p,)) for p in pieces]
    target = sum(p.rows for p in pieces) / tasks
    units, current, done = [], [], 0
    for p in pieces:
        current.append(p)
        done += p.rows
        # close the unit once the rows so far reach the next multiple of the target
        if done >= target * (len(units) + 1) - 0.5 * p.rows:
            units.append(Unit(tuple(current)))
            current = []
    if current:
        units.append(Unit(tuple(current)))
    return units


def _read_piece(piece: Piece, fs, read_batch: int, skip: int):
    """The piece's rows after the first `skip`, read_batch at a time."""
    source = fs.open_input_file(strip_scheme(piece.path)) if fs is not None else piece.path
    pf = pq.ParquetFile(source, buffer_size=READ_BUFFER, pre_buffer=False)
    batches = pf.iter_batches(
        batch_size=read_batch, row_groups=piece.row_groups, columns=[ID_COL, EMB_COL], use_threads=False
    )
    at = 0
    for batch in batches:
        if at >= piece.rows:
            break
        batch = batch.slice(0, piece.rows - at)
        at, first = at + batch.num_rows, at
        if at > skip:
            yield pa.Table.from_batches([batch.slice(max(0, skip - first))])


def read_unit(unit: Unit, fs, read_batch: int = READ_BATCH, retry_budget_s: float = 0.0, clock=None):
    """The unit's (ItemID, embedding) rows, read_batch at a time, as pyarrow Tables. A file
    that cannot be read ends the unit with one error block that names it. With a clock (the
    run's, io/retry.run_clock), an S3 outage is retried (the piece reopened after the rows
    already read) until S3 has been failing for retry_budget_s by that clock."""
    outage = TaskClock(clock) if clock is not None else None
    for piece in unit.pieces:
        done, backoff = 0, Backoff()
        while True:
            try:
                for t in _read_piece(piece, fs, read_batch, done):
                    done += t.num_rows
                    if outage is not None:
                        outage.ok()  # S3 answers (again)
                    yield t
                break
            except (OSError, pa.ArrowException) as e:
                why = one_line(e)
                if retry_budget_s and is_transient(e):
                    left = retry_budget_s - outage.failing() if outage is not None else 0
                    if left > 0:
                        time.sleep(backoff.next(left))
                        continue
                    why = (
                        f"S3 unreachable for the retry budget, --s3_retry_budget_s {retry_budget_s:g}: {why}"
                    )
                yield pa.table({ERROR_COL: [f"{piece.path}: cannot read parquet ({why})"]})
                return


class CatalogSource(Datasource):
    """The first n_items rows of the catalog's parquet files (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        n_items: int,
        read_batch: int = READ_BATCH,
        tasks: int | None = None,
    ):
        super().__init__()
        self.units = plan_units(catalog, n_items, tasks)
        self.read_batch = read_batch
        self.row_bytes = 8 + 4 * catalog.dim
        # the run's retry budget is spent here (read_unit), the S3 client's own retries are short
        self.fs = catalog.store.arrow_fs(catalog.files[0], retry_budget_s=SDK_RETRY_S)
        self.retry_budget_s = catalog.store.retry_budget_s if self.fs is not None else 0.0
        self.clock = run_clock() if self.fs is not None else None

    def estimate_inmemory_data_size(self) -> int:
        return sum(u.rows for u in self.units) * self.row_bytes

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        fs, read_batch, budget, clock = self.fs, self.read_batch, self.retry_budget_s, self.clock
        return [
            ReadTask(
                lambda unit=unit: read_unit(unit, fs, read_batch, budget, clock),
                BlockMetadata(
                    num_rows=unit.rows,
                    size_bytes=unit.rows * self.row_bytes,
                    exec_stats=None,
                    input_files=unit.paths,
                ),
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]


def training_dataset(catalog: Catalog, n_items: int, tasks: int | None = None):
    """The Ray Dataset of (ItemID, embedding) that tiger training consumes: the first n_items
    rows in file order, through the same streaming source as the catalog passes, in about
    `tasks` read tasks (one per piece without it)."""
    import ray

    src = CatalogSource(catalog, n_items, tasks=tasks)
    return ray.data.read_datasource(src, override_num_blocks=max(1, len(src.units)))
