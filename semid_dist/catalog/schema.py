"""The catalog's data contract, and the catalog as the driver knows it (no embedding read).

Input: parquet with ``ItemID`` (integer, or string of 1 to MAX_ID_BYTES UTF-8 bytes; unique; one
kind in every file) and ``embedding`` (list, large_list or fixed_size_list of floats, one length
on every row). Bad input raises a UserError naming the file and the ItemID or row. A string
ItemID travels through the tasks as its key (``id_keys``), the driver's rules use its rank
(docs/architecture.md, "String ItemIDs").

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


MAX_ID_BYTES = 1024  # the longest string ItemID, in UTF-8 bytes


class RowError(UserError):
    """A bad row found inside a Ray task; the driver adds the file name (``Catalog.with_file``).
    item_id: the row's ItemID key (an integer ItemID, or a string's utf8_keys)."""

    def __init__(self, message: str, item_id: int | None = None):
        super().__init__(message)
        self.item_id = item_id


def is_string_id(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def id_kind(t: pa.DataType) -> str:
    return "string" if is_string_id(t) else "integer"


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
    id_type: pa.DataType = field(default_factory=pa.int64)  # the first file's ItemID type

    @property
    def string_ids(self) -> bool:
        """ItemIDs are strings: the driver keeps them as one Arrow array (names), sorted
        bytewise, and every rule that orders items uses their rank in it."""
        return is_string_id(self.id_type)

    @property
    def name(self) -> str:
        """How messages name the input: its file when there is one, else "input"."""
        return self.files[0] if len(self.files) == 1 else "input"

    def open(self, path: str) -> pq.ParquetFile:
        return open_parquet(path, self.store)

    def locate_item(self, item_id: int) -> str | None:
        """The first file holding the ItemID whose key is item_id (used only to word an error
        message)."""
        for path in self.files:
            try:
                col = self.open(path).read(columns=[ID_COL]).column(0)
            except UserError:
                continue
            if is_string_id(col.type):
                if (id_keys(col.combine_chunks()) == item_id).any():
                    return path
            elif pc.any(pc.equal(col, pa.scalar(item_id, col.type))).as_py():
                return path
        return None

    def with_file(self, err: RowError) -> UserError:
        """err as a UserError that names the file holding its ItemID."""
        where = self.locate_item(err.item_id) if err.item_id is not None else None
        files = self.files
        prefix = where if where else (files[0] if len(files) == 1 else f"one of {len(files)} input files")
        return UserError(f"{prefix}: {err.args[0]}")

    def check_unique_names(self, names: pa.Array) -> None:
        """Every string ItemID once (names sorted bytewise); else a one-line error naming the
        file of the first duplicate."""
        if len(names) == 0:
            raise UserError(f"{self.name}: zero rows")
        same = pc.equal(names.slice(1), names.slice(0, len(names) - 1))
        n_dup = int(pc.sum(same).as_py() or 0)
        if n_dup:
            first = names.slice(1).filter(same)[0]
            where = self.locate_item(int(id_keys(pa.array([first.as_py()], pa.large_string()))[0]))
            raise UserError(
                f"{where or 'input'}: duplicate ItemID {first.as_py()!r} "
                f"({n_dup} duplicate row(s) in the catalog)"
            )

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
    if not (pa.types.is_integer(id_type) or is_string_id(id_type)):
        raise UserError(f"{path}: column '{ID_COL}' must be integer or string, got {id_type}")
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
    total, dim, rows, largest, first_id = 0, None, [], ("", 0), None
    for path in files:
        pf = open_parquet(path, store)
        check_schema(path, pf.schema_arrow)
        id_type = pf.schema_arrow.field(ID_COL).type
        if first_id is None:
            first_id = (path, id_type)
        elif id_kind(id_type) != id_kind(first_id[1]):
            raise UserError(
                f"{path}: ItemID is {id_type}, but {first_id[0]} has {first_id[1]}: every file of a "
                "catalog needs one ItemID type (integer or string)"
            )
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
    return Catalog(
        files, total, dim, store, rows_per_file=rows, largest_row_group=largest, id_type=first_id[1]
    )


def id_keys(names: pa.Array) -> np.ndarray:
    """String ItemIDs as int64 keys (math.sampling.utf8_keys of their UTF-8 bytes)."""
    from semid_dist.math.sampling import utf8_keys

    names = names.cast(pa.large_string())
    offsets = np.frombuffer(names.buffers()[1], np.int64)[names.offset : names.offset + len(names) + 1]
    data = (
        np.frombuffer(names.buffers()[2], np.uint8)
        if names.buffers()[2] is not None
        else np.zeros(0, np.uint8)
    )
    return utf8_keys(offsets, data)


def batch_names(batch: pa.Table) -> pa.Array | None:
    """A batch's string ItemIDs as one large_string array (None for integer ItemIDs)."""
    ids = batch.column(ID_COL)
    if not is_string_id(ids.type):
        return None
    ids = ids.chunk(0) if isinstance(ids, pa.ChunkedArray) and ids.num_chunks == 1 else ids
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    return ids.cast(pa.large_string())


def _string_keys(names: pa.Array) -> np.ndarray:
    """Validate string ItemIDs (none empty, none over MAX_ID_BYTES) and return their keys."""
    size = pc.binary_length(names).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((size == 0) | (size > MAX_ID_BYTES))
    if bad.size:
        i = int(bad[0])
        what = "empty ItemID" if size[i] == 0 else f"ItemID of {size[i]} bytes (at most {MAX_ID_BYTES})"
        shown = "" if size[i] == 0 else f" {names[i].as_py()[:40]!r}..."
        raise RowError(f"{what}{shown} at row {i} of a batch")
    return id_keys(names)


def _id_text(ids_N: np.ndarray, names: pa.Array | None, i: int) -> str:
    return repr(names[i].as_py()) if names is not None else str(ids_N[i])


def batch_to_arrays(batch: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch and return (ItemID keys int64 (N,), embeddings float32 (N, dim)): an
    integer ItemID is its own key, a string one its utf8_keys (batch_names gives the strings).

    Zero-copy where the layout allows: flatten the list column, view it as (N, dim). The view
    may be read-only (a batch from Ray's object store): copy it before writing, or to keep it.
    """
    ids = batch.column(ID_COL)
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise RowError(f"null ItemID at row {row} of a batch")
    names = batch_names(batch)
    ids_N = _string_keys(names) if names is not None else ids.to_numpy().astype(np.int64, copy=False)
    emb = batch.column(EMB_COL)
    if isinstance(emb, pa.ChunkedArray):  # one chunk: use it as is (combine_chunks would copy it)
        emb = emb.chunk(0) if emb.num_chunks == 1 else emb.combine_chunks()
    if emb.null_count:
        bad = int(np.flatnonzero(emb.is_null().to_numpy(zero_copy_only=False))[0])
        raise RowError(f"ItemID {_id_text(ids_N, names, bad)}: embedding is null", int(ids_N[bad]))
    lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        bad = int(wrong[0])
        what = (
            "empty embedding vector"
            if lengths[bad] == 0
            else f"ragged embedding: length {lengths[bad]}, expected {dim}"
        )
        raise RowError(f"ItemID {_id_text(ids_N, names, bad)}: {what}", int(ids_N[bad]))
    values = pc.list_flatten(emb)
    if values.null_count:
        raise RowError("null value inside an embedding vector")
    x_ND = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    finite_N = np.isfinite(x_ND).all(axis=1)
    if not finite_N.all():
        bad = int(np.flatnonzero(~finite_N)[0])
        raise RowError(
            f"ItemID {_id_text(ids_N, names, bad)}: embedding contains NaN or Inf", int(ids_N[bad])
        )
    return ids_N, x_ND
