"""Write the outputs of a run into a Publisher's staging area (published by the caller)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from semid_dist.io.publish import Publisher

MAPPING_JSON = "semantic_id_mappings.json"
MAPPING_PARQUET = "semantic_id_mappings.parquet"
MODEL = "final_model.pt"
PREFIX_TREE = "prefix_tree.parquet"
TOKENS = "tokens.json"
RESULTS = "training_results.json"
ROW_GROUP = 65536  # readers of a list<> column hold a whole row group: keep them moderate


def semantic_ids(codes_NL: np.ndarray, dedup_N: np.ndarray) -> np.ndarray:
    """(N, L+1) int32: the L codes followed by the dedup code (int32: 4 bytes a code keep the
    driver's memory per item small; codes are < 65,536 and a dedup code < N)."""
    assert codes_NL.shape[0] < 2**31
    out = np.empty((codes_NL.shape[0], codes_NL.shape[1] + 1), np.int32)
    out[:, :-1] = codes_NL
    out[:, -1] = dedup_N
    return out


LETTERS = "abcdefghijklmnopqrstuvwxyz"  # one per level in the LC-Rec style tokens
JSON_CHUNK = 65536  # items formatted at a time: the JSON files are streamed, never held whole


def _is_names(ids) -> bool:
    return isinstance(ids, (pa.Array, pa.ChunkedArray))


def _keys(ids, s: int) -> list:
    """JSON keys of items s.. s+JSON_CHUNK: integer ItemIDs as numbers (formatted "%d" in
    quotes), string ItemIDs as JSON strings, as given (UTF-8, escaped only where JSON must)."""
    if not _is_names(ids):
        return ids[s : s + JSON_CHUNK].tolist()
    return [json.dumps(v, ensure_ascii=False) for v in ids.slice(s, JSON_CHUNK).to_pylist()]


def _mapping_parts(ids_N, sid_NM: np.ndarray):
    m = sid_NM.shape[1] if sid_NM.ndim == 2 else 0
    fmt = ("  %s: [" if _is_names(ids_N) else '  "%d": [') + ", ".join(["%d"] * m) + "]"
    yield "{\n"
    for s in range(0, len(ids_N), JSON_CHUNK):
        cols = [_keys(ids_N, s)] + [sid_NM[s : s + JSON_CHUNK, j].tolist() for j in range(m)]
        yield (",\n" if s else "") + ",\n".join([fmt % t for t in zip(*cols, strict=True)])
    yield "\n}\n"


def mapping_json(ids_N, sid_NM: np.ndarray) -> str:
    """The original tool's format {"<ItemID>": [c0, ..., dedup]}, one item per line, ItemID order."""
    return "".join(_mapping_parts(ids_N, sid_NM))


def _index_parts(ids_N, sid_NM: np.ndarray):
    """The bytes of json.dumps({str(id): ["<a_c0>", "<b_c1>", ...]}, indent=1) + newline,
    formatted per chunk (keys are digits and tokens plain ASCII: nothing to escape)."""
    if len(ids_N) == 0:
        yield "{}\n"
        return
    m = sid_NM.shape[1]
    key = " %s: [\n" if _is_names(ids_N) else ' "%d": [\n'
    fmt = key + ",\n".join(f'  "<{LETTERS[lv]}_%d>"' for lv in range(m)) + "\n ]"
    yield "{\n"
    for s in range(0, len(ids_N), JSON_CHUNK):
        cols = [_keys(ids_N, s)] + [sid_NM[s : s + JSON_CHUNK, j].tolist() for j in range(m)]
        yield (",\n" if s else "") + ",\n".join([fmt % t for t in zip(*cols, strict=True)])
    yield "\n}\n"


def index_json(ids_N: np.ndarray, sid_NM: np.ndarray) -> str:
    """LC-Rec style tokens: level l's code c becomes "<{letter_l}_{c}>" (a, b, c, ... per level)."""
    return "".join(_index_parts(ids_N, sid_NM))


def mapping_table(ids_N, sid_NM: np.ndarray, id_type: pa.DataType | None = None) -> pa.Table:
    """ItemID (int64, or string ItemIDs in the input's type id_type) and semantic_id."""
    m = sid_NM.shape[1]
    codes = pa.FixedSizeListArray.from_arrays(pa.array(sid_NM.astype(np.int32, copy=False).ravel()), m)
    ids = ids_N.cast(id_type or pa.large_string()) if _is_names(ids_N) else pa.array(ids_N, pa.int64())
    return pa.table({"ItemID": ids, "semantic_id": codes})


def _write_parts(pub: Publisher, name: str, parts) -> None:
    with pub.open(name, "w") as f:
        for part in parts:
            f.write(part)


def write_mappings(pub: Publisher, ids_N, sid_NM: np.ndarray, dataset: str, id_type=None) -> None:
    """ids_N: integer ItemIDs (numpy), or string ItemIDs (an Arrow array, written as id_type)."""
    # Streamed, JSON_CHUNK items at a time: the whole strings of a catalog of millions of items
    # (and the Python objects behind them) would take GBs.
    _write_parts(pub, MAPPING_JSON, _mapping_parts(ids_N, sid_NM))
    _write_parts(pub, f"{dataset}.index.json", _index_parts(ids_N, sid_NM))
    with pub.open(MAPPING_PARQUET, "wb") as f:
        table = mapping_table(ids_N, sid_NM, id_type)
        pq.write_table(table, f, row_group_size=ROW_GROUP, compression="zstd")


def token(level: int, code: int) -> str:
    """LC-Rec style token of a code: level 0 is "<a_code>", level 1 "<b_code>", and so on."""
    return f"<{LETTERS[level]}_{code}>"


def write_retrieval_files(pub: Publisher, sid_NM: np.ndarray, n_codes: int) -> None:
    """What constrained generative retrieval needs (docs/architecture.md, Outputs):
    prefix_tree.parquet, one row per prefix some ID starts with: depth, prefix (its codes) and
    next (the sorted codes that may follow it); and tokens.json, every token an ID can use
    (n_codes per level, then the dedup codes issued), to add to an LLM's tokenizer."""
    from semid_dist.math.prefix_tree import prefix_tree

    cols = {"depth": [], "prefix": [], "next": []}
    for lv in prefix_tree(sid_NM):
        n = len(lv.prefixes_PD)
        cols["depth"].append(pa.array(np.full(n, lv.depth, np.int8)))
        pre_off = pa.array(np.arange(n + 1, dtype=np.int32) * lv.depth)
        cols["prefix"].append(
            pa.ListArray.from_arrays(pre_off, pa.array(lv.prefixes_PD.ravel().astype(np.int32)))
        )
        cols["next"].append(
            pa.ListArray.from_arrays(
                pa.array(lv.offsets_P1.astype(np.int32)), pa.array(lv.next_C.astype(np.int32))
            )
        )
    table = pa.table({k: pa.chunked_array(v) for k, v in cols.items()})
    with pub.open(PREFIX_TREE, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP, compression="zstd")
    levels = sid_NM.shape[1] - 1
    dedup = int(sid_NM[:, -1].max()) + 1 if len(sid_NM) else 1
    vocab = [token(lv, c) for lv in range(levels) for c in range(n_codes)] + [
        token(levels, c) for c in range(dedup)
    ]
    pub.write_text(TOKENS, json.dumps(vocab) + "\n")


def write_torch(pub: Publisher, name: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with pub.open(name, "wb") as f:
        f.write(buf.getvalue())


def write_results(pub: Publisher, results: dict) -> None:
    pub.write_text(RESULTS, json.dumps(results, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
