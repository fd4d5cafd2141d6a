"""A nightly output root: the LATEST pointer, its generations, and their parquet tables.

    LATEST                              {"generation": NAME, "seq": n, ...}: written LAST
    generations/NAME/                   published by a Publisher (_SUCCESS written last)
        semantic_id_mappings.json       the original format {"<ItemID>": [c0, ..., dedup]}
        semantic_id_mappings.parquet    ItemID, semantic_id, fingerprint, tokenizer
        <dataset>.index.json            LC-Rec style tokens
        prefix_tree.parquet, tokens.json  the live IDs' prefix tree and token vocabulary
        retired_ids.parquet             every ID retired so far (never handed to another item)
        final_model.pt                  the tokenizer used that night (a byte-exact copy when reused)
        generation.json                 name, seq, parent, content digest, counts (deterministic)
        training_results.json, logs/    as for a training run, plus the counts

Only the parent generation is read (its retired list carries the whole history). The ID policy
itself is pure and lives in math/generations.py; docs/nightly.md describes both.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semid_dist import export
from semid_dist.catalog.names import as_names
from semid_dist.catalog.schema import is_string_id
from semid_dist.errors import UserError, one_line
from semid_dist.io.publish import SUCCESS, Publisher
from semid_dist.io.storage import Storage, is_s3, join, strip_scheme
from semid_dist.math import generations as gen

log = logging.getLogger("semid_dist")

LATEST = "LATEST"
GENERATIONS = "generations"
MANIFEST = "generation.json"
RETIRED = "retired_ids.parquet"


@dataclass
class Generation:
    name: str
    seq: int
    manifest: dict
    mapping: gen.IdTable
    retired: gen.RetiredTable
    model_bytes: bytes
    names: pa.Array | None = None  # string ItemIDs of mapping's rows (its ids are then ranks)
    retired_names: pa.Array | None = None  # and of the retired list's rows (ids: placeholders)

    @property
    def id_kind(self) -> str:
        return "integer" if self.names is None else "string"


class Lineage:
    """A nightly output root: LATEST and generations/<name>/ on one filesystem."""

    def __init__(self, output_dir: str, store: Storage):
        self.uri = output_dir.rstrip("/")
        self.s3 = is_s3(output_dir)
        self.fs = store.fs(output_dir)
        self.path = strip_scheme(output_dir).rstrip("/")

    def gen_uri(self, name: str) -> str:
        return join(self.uri, GENERATIONS, name)

    def _read(self, *parts: str) -> bytes | None:
        p = join(self.path, *parts)
        try:
            with self.fs.open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as e:
            raise UserError(f"{join(self.uri, *parts)}: cannot read: {one_line(e)}") from e

    def latest(self) -> dict | None:
        self.fs.invalidate_cache()
        raw = self._read(LATEST)
        if raw is None:
            return None
        try:
            latest = json.loads(raw)
            assert isinstance(latest["generation"], str)
        except Exception as e:
            raise UserError(f"{join(self.uri, LATEST)}: not a LATEST pointer ({e})") from e
        return latest

    def manifest(self, name: str) -> dict | None:
        """generation.json of a PUBLISHED generation (one with _SUCCESS), else None."""
        if self._read(GENERATIONS, name, SUCCESS) is None:
            return None
        raw = self._read(GENERATIONS, name, MANIFEST)
        if raw is None:
            raise UserError(f"{self.gen_uri(name)}: published, but {MANIFEST} is missing")
        return json.loads(raw)

    def load(self, name: str) -> Generation:
        manifest = self.manifest(name)
        if manifest is None:
            raise UserError(
                f"{self.gen_uri(name)}: parent generation {name} is not published "
                f"(no {SUCCESS}); LATEST or generation.json names it"
            )
        width = int(manifest["id_width"])
        mapping = _read_table(self._read(GENERATIONS, name, export.MAPPING_PARQUET), self.gen_uri(name))
        retired = _read_table(self._read(GENERATIONS, name, RETIRED), self.gen_uri(name))
        strings = is_string_id(mapping.schema.field("ItemID").type)
        return Generation(
            name,
            int(manifest["seq"]),
            manifest,
            _id_table(mapping, width),
            _retired_table(retired, width),
            self.model_bytes(name),
            as_names(mapping.column("ItemID")) if strings else None,
            as_names(retired.column("ItemID")) if strings else None,
        )

    def model_bytes(self, name: str) -> bytes:
        model = self._read(GENERATIONS, name, export.MODEL)
        if model is None:
            raise UserError(f"{self.gen_uri(name)}: {export.MODEL} is missing")
        return model

    def write_latest(self, pointer: dict) -> None:
        """Atomic: a reader sees the old pointer or the new one, never a partial file."""
        data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
        dst = join(self.path, LATEST)
        if self.s3:
            self.fs.pipe_file(dst, data)  # one PUT: S3 makes an object visible whole or not at all
            return
        tmp = join(self.path, f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)


# --- parquet <-> tables ------------------------------------------------------------------


def _read_table(raw: bytes | None, where: str) -> pa.Table:
    if raw is None:
        raise UserError(f"{where}: generation files are missing")
    return pq.read_table(io.BytesIO(raw))


def _sid_column(table: pa.Table, width: int) -> np.ndarray:
    col = table.column("semantic_id").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, width)


def _np(table: pa.Table, name: str, dtype) -> np.ndarray:
    col = table.column(name)
    if name == "ItemID" and is_string_id(col.type):  # ranks, filled in by the night (nightly.py)
        return np.zeros(len(col), dtype)
    return col.to_numpy().astype(dtype)


def _id_table(t: pa.Table, width: int) -> gen.IdTable:
    return gen.IdTable(
        _np(t, "ItemID", np.int64),
        _np(t, "fingerprint", np.uint64),
        _sid_column(t, width),
        _np(t, "tokenizer", np.uint64),
    )


def _retired_table(t: pa.Table, width: int) -> gen.RetiredTable:
    reason = np.where(
        pc.equal(t.column("reason").cast(pa.string()), "changed").to_numpy(zero_copy_only=False),
        gen.CHANGED,
        gen.REMOVED,
    ).astype(np.int8)
    return gen.RetiredTable(
        _np(t, "ItemID", np.int64),
        _np(t, "fingerprint", np.uint64),
        _sid_column(t, width),
        _np(t, "tokenizer", np.uint64),
        _np(t, "retired_seq", np.int64),
        reason,
    )


def _sid_array(sid_NM: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(sid_NM.astype(np.int32).ravel()), sid_NM.shape[1])


def _ids(ids: np.ndarray, names: pa.Array | None) -> pa.Array:
    return pa.array(ids, pa.int64()) if names is None else names


def mapping_parquet(m: gen.IdTable, names: pa.Array | None = None) -> pa.Table:
    return pa.table(
        {
            "ItemID": _ids(m.ids, names),
            "semantic_id": _sid_array(m.sid),
            "fingerprint": pa.array(m.fp, pa.uint64()),
            "tokenizer": pa.array(m.tok, pa.uint64()),
        }
    )


def retired_parquet(r: gen.RetiredTable, item_names: pa.Array | None = None) -> pa.Table:
    names = [gen.REASON_NAMES[gen.REMOVED], gen.REASON_NAMES[gen.CHANGED]]
    reason = pa.DictionaryArray.from_arrays(pa.array((r.reason == gen.CHANGED).astype(np.int8)), names)
    return pa.table(
        {
            "semantic_id": _sid_array(r.sid),
            "ItemID": _ids(r.ids, item_names),
            "fingerprint": pa.array(r.fp, pa.uint64()),
            "tokenizer": pa.array(r.tok, pa.uint64()),
            "retired_seq": pa.array(r.seq, pa.int64()),
            "reason": reason,
        }
    )


def content_digest(
    a: gen.Assignment,
    name: str,
    seq: int,
    parent: str | None,
    tok_fp: int,
    names: tuple[pa.Array, pa.Array] | None = None,
) -> str:
    """What a generation IS (IDs, fingerprints, retired list, tokenizer), independent of file
    encodings, timings and run ids: two runs with equal digests published the same thing.
    names: string ItemIDs of the mapping and the retired list (their ids are then ranks)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([name, seq, parent, f"{tok_fp:016x}"]).encode())
    for arr in names or ():
        arr = as_names(arr)
        for buf in arr.cast(pa.large_binary()).take(pa.array(np.arange(len(arr)))).buffers()[1:]:
            h.update(b"" if buf is None else buf.to_pybytes())
    for arr in (
        a.mapping.ids,
        a.mapping.fp,
        a.mapping.sid,
        a.mapping.tok,
        a.retired.ids,
        a.retired.fp,
        a.retired.sid,
        a.retired.tok,
        a.retired.seq,
        a.retired.reason,
    ):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> int:
    """64-bit hash of what makes the codes: mode, architecture and every tensor's bytes."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(tok.mode.encode())
    architecture, tensors = tok.fingerprint_parts()
    h.update(architecture)
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def write_generation(
    pub: Publisher,
    a: gen.Assignment,
    model_bytes: bytes,
    manifest: dict,
    dataset: str,
    n_codes: int,
    names: tuple[pa.Array, pa.Array] | None = None,
) -> None:
    """A generation's files into pub's staging area: the live IDs (mappings, their prefix tree
    and tokens), the retired list, the tokenizer's bytes and generation.json. names: for string
    ItemIDs, those of the mapping's and the retired list's rows."""
    m = a.mapping
    names, retired_names = names or (None, None)
    pub.write_text(export.MAPPING_JSON, export.mapping_json(m.ids if names is None else names, m.sid))
    pub.write_text(f"{dataset}.index.json", export.index_json(m.ids if names is None else names, m.sid))
    export.write_retrieval_files(pub, m.sid, n_codes)
    tables = (
        (export.MAPPING_PARQUET, mapping_parquet(m, names)),
        (RETIRED, retired_parquet(a.retired, retired_names)),
    )
    for fname, table in tables:
        with pub.open(fname, "wb") as f:
            pq.write_table(table, f, row_group_size=export.ROW_GROUP, compression="zstd")
    with pub.open(export.MODEL, "wb") as f:
        f.write(model_bytes)
    pub.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def move_latest(
    root: Lineage, name: str, seq: int, parent: str | None, digest: str, latest_at_start: dict | None
) -> str:
    """LATEST moves forward only: from this generation's parent (or from nothing) to it."""
    now = root.latest()
    at = now["generation"] if now else None
    if at == name:
        return "unchanged (already names this generation)"
    if at != parent:
        if (latest_at_start or {}).get("generation") != at:
            raise UserError(
                f"{join(root.uri, LATEST)} moved to {at} during this run (another "
                f"nightly run?); generation {name} is published but LATEST was not moved"
            )
        log.warning("LATEST names %s, a later generation than %s's parent: left as is", at, name)
        return f"unchanged (names {at})"
    root.write_latest(
        {
            "generation": name,
            "seq": seq,
            "parent": parent,
            "content_digest": digest,
            "path": f"{GENERATIONS}/{name}",
        }
    )
    log.info("LATEST -> %s", name)
    return "moved"
