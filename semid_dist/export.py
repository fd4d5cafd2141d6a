"""Write the outputs of a run into a Publisher's staging area (published by the caller)."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from semid_dist.storage import Publisher

MAPPING_JSON = "semantic_id_mappings.json"
MAPPING_PARQUET = "semantic_id_mappings.parquet"
MODEL = "final_model.pt"
RESULTS = "training_results.json"
ROW_GROUP = 65536  # large row groups of list<> columns exhaust memory on read (DESIGN.md §6)


def semantic_ids(codes_NL: np.ndarray, dedup_N: np.ndarray) -> np.ndarray:
    """(N, L+1): the L codes followed by the dedup code."""
    return np.concatenate([codes_NL, dedup_N[:, None]], axis=1).astype(np.int64)


def mapping_json(ids_N: np.ndarray, sid_NM: np.ndarray) -> str:
    """The seed's format {"<ItemID>": [c0, ..., dedup]}, one item per line, ItemID order."""
    lines = [f'  "{i}": [{", ".join(map(str, row))}]' for i, row in zip(ids_N.tolist(), sid_NM.tolist())]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def index_json(ids_N: np.ndarray, sid_NM: np.ndarray) -> str:
    """LC-Rec style tokens: level l's code c becomes "<{letter_l}_{c}>" (a, b, c, ... per level)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = {}
    for i, row in zip(ids_N.tolist(), sid_NM.tolist()):
        out[str(i)] = [f"<{letters[l]}_{c}>" for l, c in enumerate(row)]
    return json.dumps(out, indent=1) + "\n"


def mapping_table(ids_N: np.ndarray, sid_NM: np.ndarray) -> pa.Table:
    m = sid_NM.shape[1]
    codes = pa.FixedSizeListArray.from_arrays(pa.array(sid_NM.astype(np.int32).ravel()), m)
    return pa.table({"ItemID": pa.array(ids_N, pa.int64()), "semantic_id": codes})


def write_mappings(pub: Publisher, ids_N: np.ndarray, sid_NM: np.ndarray, dataset: str) -> None:
    pub.write_text(MAPPING_JSON, mapping_json(ids_N, sid_NM))
    pub.write_text(f"{dataset}.index.json", index_json(ids_N, sid_NM))
    with pub.open(MAPPING_PARQUET, "wb") as f:
        pq.write_table(mapping_table(ids_N, sid_NM), f, row_group_size=ROW_GROUP, compression="zstd")


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
