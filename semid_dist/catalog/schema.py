"""The catalog's data contract, and the catalog as the driver knows it (no embedding read).

Input: parquet with ``ItemID`` (integer, unique) and ``embedding`` (list, large_list or
fixed_size_list of floats, one length on every row). Bad input raises a UserError naming the
file and the ItemID or row.

The happy path carries no file names through the pipeline (a string per row would cost more
than the codes themselves); when a batch fails validation, the driver finds the offending file
afterwards by looking for the ItemID in each file (``Catalog.locate_item``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semid_dist.errors import UserError, one_line
from semid_dist.io.storage import Storage, strip_scheme

ID_COL, EMB_COL = "ItemID", "embedding"
# Files larger than this become several read tasks, cut between row groups (source.plan_pieces);
# a row group is always read by one task.
SPLIT_ROWS = 4 * 65536


class RowError(UserError):
    """A bad row found inside a Ray task; the driver adds the file name (``Catalog.with_file``)."""

    def __init__(self, message: str, item_id: int | None = None):
        super().__init__(message)
        self.item_id = item_id


@dataclass
class Catalog:
    """The input files, their row counts and embedding size, read from the footers and one row,
    and the storage they are on."""

    files: list[str]
    num_rows: int
    dim: int
    store: Storage = field(default_factory=Storage)
    rows_per_file: list[int] = field(default_factory=list)  # from the footers, in files order
    largest_row_group: tuple[str, int] = ("", 0)  # (file, rows) of the largest row group

    @property
    def name(self) -> str:
        """How messages name the input: its file when there is one, else "input"."""
        return self.files[0] if len(self.files) == 1 else "input"

    def open(self, path: str) -> pq.ParquetFile:
        return open_parquet(path, self.store)

    def locate_item(self, item_id: int) -> str | None:
        """The first file holding ItemID item_id (used only to word an error message)."""
        for path in self.files:
            try:
                col = self.open(path).read(columns=[ID_COL]).column(0)
            except UserError:
                continue
            if pc.any(pc.equal(col, pa.scalar(item_id, col.type))).as_py():
                return path
        return None

    def with_file(self, err: RowError) -> UserError:
        """err as a UserError that names the file holding its ItemID."""
        where = self.locate_item(err.item_id) if err.item_id is not None else None
        files = self.files
        prefix = where if where else (files[0] if len(files) == 1 else f"one of {len(files)} input files")
        return UserError(f"{prefix}: {err.args[0]}")

    def check_unique_ids(self, ids_N: np.ndarray) -> None:
        """Every ItemID once; else a one-line error naming the file of the first duplicate."""
        if ids_N.size == 0:
            raise UserError(f"{self.name}: zero rows")
        s = np.sort(ids_N)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if dup.size:
            item = int(s[dup[0]])
            where = self.locate_item(item) or "input"
            raise UserError(f"{where}: duplicate ItemID {item} ({dup.size} duplicate row(s) in the catalog)")


def open_parquet(path: str, store: Storage) -> pq.ParquetFile:
    """A ParquetFile with buffered column reads and no pre-buffering (pyarrow's default
    pre-buffers every column chunk a read touches): reading a few rows then decodes only the
    first pages of a column chunk, not the whole chunk, which matters for a catalog written as
    one big row group."""
    try:
        return pq.ParquetFile(
            store.fs(path).open(strip_scheme(path), "rb"), buffer_size=1 << 20, pre_buffer=False
        )
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({one_line(e)})") from e


def check_schema(path: str, schema: pa.Schema) -> None:
    names = schema.names
    for col in (ID_COL, EMB_COL):
        if col not in names:
            raise UserError(f"{path}: missing column '{col}' (columns: {', '.join(names)})")
    id_type = schema.field(ID_COL).type
    if not pa.types.is_integer(id_type):
        raise UserError(f"{path}: column '{ID_COL}' must be integer, got {id_type}")
    emb_type = schema.field(EMB_COL).type
    is_list = (
        pa.types.is_list(emb_type)
        or pa.types.is_large_list(emb_type)
        or pa.types.is_fixed_size_list(emb_type)
    )
    if not is_list or not (
        pa.types.is_floating(emb_type.value_type) or pa.types.is_integer(emb_type.value_type)
    ):
        raise UserError(f"{path}: column '{EMB_COL}' must be a list of floats, got {emb_type}")


def inspect_catalog(files: list[str], store: Storage) -> Catalog:
    """Check every file's footer (columns, types, row count) and find the embedding size."""
    total, dim, rows, largest = 0, None, [], ("", 0)
    for path in files:
        pf = open_parquet(path, store)
        check_schema(path, pf.schema_arrow)
        n = pf.metadata.num_rows
        total += n
        rows.append(n)
        group = max((pf.metadata.row_group(rg).num_rows for rg in range(pf.num_row_groups)), default=0)
        if group > largest[1]:
            largest = (path, group)
        if dim is None and n > 0:
            for rg in range(pf.num_row_groups):
                if pf.metadata.row_group(rg).num_rows:  # one row, not the whole row group
                    first = next(pf.iter_batches(batch_size=1, row_groups=[rg], columns=[EMB_COL]))
                    lengths = pc.list_value_length(first.column(0))
                    dim = int(lengths[0].as_py() or 0)
                    break
            if dim == 0:
                raise UserError(f"{path}: empty embedding vector in the first row")
    if total == 0:
        name = files[0] if len(files) == 1 else "input"
        raise UserError(f"{name}: zero rows in {len(files)} parquet file(s)")
    assert dim is not None
    return Catalog(files, total, dim, store, rows_per_file=rows, largest_row_group=largest)


def batch_to_arrays(batch: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch and return (ItemID int64 (N,), embeddings float32 (N, dim)).

    Zero-copy where the layout allows: flatten the list column, view it as (N, dim). The view
    may be read-only (a batch from Ray's object store): copy it before writing, or to keep it.
    """
    ids = batch.column(ID_COL)
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise RowError(f"null ItemID at row {row} of a batch")
    ids_N = ids.to_numpy().astype(np.int64, copy=False)
    emb = batch.column(EMB_COL)
    if isinstance(emb, pa.ChunkedArray):  # one chunk: use it as is (combine_chunks would copy it)
        emb = emb.chunk(0) if emb.num_chunks == 1 else emb.combine_chunks()
    if emb.null_count:
        bad = int(np.flatnonzero(emb.is_null().to_numpy(zero_copy_only=False))[0])
        raise RowError(f"ItemID {ids_N[bad]}: embedding is null", int(ids_N[bad]))
    lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        bad = int(wrong[0])
        what = (
            "empty embedding vector"
            if lengths[bad] == 0
            else f"ragged embedding: length {lengths[bad]}, expected {dim}"
        )
        raise RowError(f"ItemID {ids_N[bad]}: {what}", int(ids_N[bad]))
    values = pc.list_flatten(emb)
    if values.null_count:
        raise RowError("null value inside an embedding vector")
    x_ND = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    finite_N = np.isfinite(x_ND).all(axis=1)
    if not finite_N.all():
        bad = int(np.flatnonzero(~finite_N)[0])
        raise RowError(f"ItemID {ids_N[bad]}: embedding contains NaN or Inf", int(ids_N[bad]))
    return ids_N, x_ND
