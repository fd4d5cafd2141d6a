"""The interactions input of ``semid evaluate``: read, validate, turn into user histories.

Input: parquet (a file, a directory of shards, a glob, or s3://) with the columns
``UserID`` (integer or string), ``ItemID`` (integer or string: the kind of the run's ItemIDs)
and ``timestamp`` (integer, float, or an Arrow timestamp/date type, read as its integer value);
other columns are not read. Every bad input raises a UserError of one line naming the file: no
parquet, an unreadable file, a missing column, a column of the wrong type, shards that disagree
on a column's type (both files named), a null, a NaN or infinite timestamp, zero rows, ItemIDs of
another kind than the run's. Every ItemID must be in the run's mapping. String ItemIDs become
their positions in the run's sorted ItemIDs here, so that everything after (histories, the
retriever, the figures) is integer.

The table returned carries the input's path in its schema metadata (``SOURCE_KEY``), so that
``to_histories`` can name it in its own errors.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.catalog.names import is_names, positions
from semid_dist.catalog.schema import open_parquet
from semid_dist.errors import UserError, one_line
from semid_dist.io.storage import Storage
from semid_dist.math.histories import Histories, build_histories

COLUMNS = ("UserID", "ItemID", "timestamp")
SOURCE_KEY = b"semid_source"
TS_RULE = "timestamp must be numeric (integer, float, or a timestamp type)"
MAX_EXAMPLES = 5


def _value_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _kind(col: str, t: pa.DataType) -> str:
    """What a column's type means once read: shards must agree on it. Integer widths and string
    offsets may differ (they are cast to one type); timestamp units may not (the values differ)."""
    t = _value_type(t)
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if _is_string(t):
        return "string"
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}]"
    return str(t)


def _check_type(path: str, col: str, t: pa.DataType) -> None:
    t = _value_type(t)
    if col == "UserID" and not (pa.types.is_integer(t) or _is_string(t)):
        raise UserError(f"{path}: UserID must be integer or string, found {t}")
    if col == "ItemID" and not (pa.types.is_integer(t) or _is_string(t)):
        raise UserError(f"{path}: ItemID must be integer or string, found {t}")
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if col == "timestamp" and not (numeric or pa.types.is_timestamp(t) or pa.types.is_date(t)):
        raise UserError(f"{path}: {TS_RULE}, found {t}")


def _check_schemas(files: list[str], store: Storage) -> None:
    """Columns and types from every file's footer, before any data is read."""
    first: dict[str, tuple[str, pa.DataType]] = {}  # column -> (first file, its type there)
    for path in files:
        schema = open_parquet(path, store).schema_arrow
        for col in COLUMNS:
            if col not in schema.names:
                raise UserError(f"{path}: missing column '{col}' (columns: {', '.join(schema.names)})")
            t = schema.field(col).type
            _check_type(path, col, t)
            path0, t0 = first.setdefault(col, (path, t))
            if _kind(col, t) != _kind(col, t0):
                raise UserError(f"{path}: column '{col}' is {t} here but {t0} in {path0}")


def _normalize(col: str, a: pa.ChunkedArray) -> pa.ChunkedArray:
    """One type per column across shards: int64 / large_string UserID and ItemID, int64 or
    float64 timestamp (a timestamp or date as its integer value)."""
    t = _value_type(a.type)
    if a.type != t:
        a = a.cast(t)
    if _is_string(t):
        return a.cast(pa.large_string())
    if pa.types.is_floating(t):
        return a.cast(pa.float64())
    if pa.types.is_date32(t):  # arrow casts date32 to int32 only
        a = a.cast(pa.int32())
    return a.cast(pa.int64())


def _read_file(path: str, store: Storage) -> pa.Table:
    try:
        table = open_parquet(path, store).read(columns=list(COLUMNS))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable parquet file ({one_line(e)})") from e
    cols = {}
    for col in COLUMNS:
        a = table.column(col)
        if a.null_count:
            raise UserError(f"{path}: {a.null_count} null value(s) in column '{col}'")
        cols[col] = _normalize(col, a)
    ts = cols["timestamp"]
    if pa.types.is_floating(ts.type):
        bad = len(ts) - pc.sum(pc.is_finite(ts)).as_py() if len(ts) else 0
        if bad:
            raise UserError(f"{path}: {bad} NaN or infinite timestamp(s)")
    return pa.table(cols)


def read_interactions(path: str, store: Storage) -> pa.Table:
    """The (UserID, ItemID, timestamp) rows of every parquet file at path, validated, in file
    order; the schema metadata holds path under SOURCE_KEY."""
    files = store.list_parquet(path)
    if not files:
        raise UserError(f"{path}: no parquet files found")
    _check_schemas(files, store)
    table = pa.concat_tables([_read_file(f, store) for f in files])
    if table.num_rows == 0:
        raise UserError(f"{files[0] if len(files) == 1 else path}: zero rows in {len(files)} parquet file(s)")
    return table.replace_schema_metadata({SOURCE_KEY: path.encode()})


def _item_index(items: pa.ChunkedArray, item_ids_N, run_name: str, src: str) -> np.ndarray:
    """Each ItemID's index in item_ids_N (the run's ItemIDs, sorted, unique); ItemIDs of another
    kind than the run's, or absent from it, are a UserError."""
    kind, run_kind = ("string" if is_names(a) else "integer" for a in (items, item_ids_N))
    if kind != run_kind:
        raise UserError(
            f"{src}ItemID is {kind}, but {run_name} maps {run_kind} ItemIDs (the interactions "
            "need the ItemID type of the run's catalog)"
        )
    idx_T = positions(items, item_ids_N)
    missing = idx_T < 0
    if missing.any():
        if kind == "string":
            distinct = items.filter(pa.array(missing)).unique()
            first = distinct.take(pc.sort_indices(distinct)[:MAX_EXAMPLES]).to_pylist()
            examples = ", ".join(map(repr, first))
        else:
            distinct = np.unique(items.to_numpy()[missing])
            examples = ", ".join(str(int(i)) for i in distinct[:MAX_EXAMPLES])
        raise UserError(
            f"{src}{int(missing.sum())} interactions ({len(distinct)} distinct ItemIDs) are not in "
            f"{run_name}'s mapping, e.g. {examples}"
        )
    return idx_T


def _ascending(ids_N) -> bool:
    if is_names(ids_N):
        return bool(pc.all(pc.less(ids_N.slice(0, len(ids_N) - 1), ids_N.slice(1))).as_py())
    return bool((np.diff(ids_N) > 0).all())


def _user_codes(users: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray | None]:
    """(code per row, UserID per code) with codes numbered in UserID order; for integer UserIDs
    the values themselves and None. Strings are dictionary-encoded and sorted in arrow (bytewise
    UTF-8, which is code-point order, as Python sorts str)."""
    t = _value_type(users.type)
    if not _is_string(t):
        return users.cast(pa.int64()).to_numpy(), None
    enc = users.cast(t).combine_chunks().dictionary_encode()
    order_D = pc.array_sort_indices(enc.dictionary).to_numpy()
    rank_D = np.empty_like(order_D)
    rank_D[order_D] = np.arange(order_D.size)
    codes_T = rank_D[enc.indices.to_numpy()]
    return codes_T, enc.dictionary.take(pa.array(order_D)).to_numpy(zero_copy_only=False)


def to_histories(
    table: pa.Table, item_ids_N: np.ndarray, run_name: str, min_len: int = 3
) -> tuple[Histories, dict]:
    """Per-user chronological histories of item indices into item_ids_N (the run's ItemIDs,
    sorted ascending, unique: int64, or an Arrow array of strings, as catalog.names.sorted_ids
    gives them), users with fewer than min_len interactions dropped. The info dict is
    build_histories' plus "rows" (the input's rows)."""
    if not is_names(item_ids_N):
        item_ids_N = np.asarray(item_ids_N, dtype=np.int64)
    if len(item_ids_N) > 1 and not _ascending(item_ids_N):
        raise ValueError("item_ids_N must be sorted ascending and unique")
    meta = table.schema.metadata or {}
    src = f"{meta[SOURCE_KEY].decode()}: " if SOURCE_KEY in meta else ""
    index_T = _item_index(table.column("ItemID"), item_ids_N, run_name, src)
    codes_T, names = _user_codes(table.column("UserID"))
    h, info = build_histories(codes_T, index_T, table.column("timestamp").to_numpy(), min_len)
    if names is not None:  # back from codes to the UserIDs themselves
        h.users_U = names[h.users_U]
    if info["users"] == 0:
        raise UserError(f"{src}no user has at least {min_len} interactions")
    return h, {**info, "rows": table.num_rows}
