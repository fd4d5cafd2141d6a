"""Nightly catalog tokenization: a new *generation* of semantic IDs that keeps stable IDs stable.

    semid nightly --data_path s3://bucket/catalog/ --output_dir s3://bucket/semid/ [--generation NAME]

Layout under --output_dir (a local folder or an s3:// prefix):

    LATEST                              {"generation": NAME, "seq": n, ...}: written LAST
    generations/NAME/                   published by storage.Publisher (_SUCCESS written last)
        semantic_id_mappings.json       the seed's format {"<ItemID>": [c0, ..., dedup]}
        semantic_id_mappings.parquet    ItemID, semantic_id, fingerprint, tokenizer
        <dataset>.index.json            LC-Rec style tokens
        retired_ids.parquet             every ID retired so far (never handed to another item)
        final_model.pt                  the tokenizer used tonight (a byte-exact copy when reused)
        generation.json                 name, seq, parent, content digest, counts (deterministic)
        training_results.json, logs/    as for a training run, plus the counts
        _SUCCESS

One night: read LATEST (the parent generation), pick the tokenizer (--retrain: fit one with
the training path; else --tokenizer; else the parent's copy; first night without either:
fit one), ONE pass over the catalog that encodes every item and fingerprints its embedding,
assign IDs with ``math.generations.assign`` (the policy lives there), stage and publish
generations/NAME, then move LATEST (local: os.replace of a temp file; S3: one PUT, atomic).
A crash at any point before that leaves LATEST on the parent; readers go through LATEST.

Re-running a night whose generation is already published never rewrites it (downstream jobs
may have read it): the catalog is re-encoded with that generation's own tokenizer against its
own parent, and the content digest must match. Identical: nothing is written, except that
LATEST is moved to it if it still names its parent (the crash-after-publish case). Different
(tonight's catalog changed since): a one-line error; publish under another --generation name.
One writer at a time per output root (LATEST is re-read before it moves, to catch a second).

Only the parent generation is read (its retired list carries the whole history), so older
generations may be deleted, except a generation's parent while that night may be re-run.
After a --retrain, kept IDs still carry the codes of the tokenizer that made them (the
mapping's ``tokenizer`` column names it by fingerprint); this generation's final_model.pt
reproduces exactly the IDs whose ``tokenizer`` equals generation.json's tokenizer_fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semid_dist import __version__, export, passes, storage, train
from semid_dist import data as datalib
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math import generations as gen
from semid_dist.math.metrics import collision_stats, quality_report
from semid_dist.runtime import close_logging, setup_logging

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


class _Root:
    """The output root: LATEST and generations/<name>/ on one fsspec filesystem."""

    def __init__(self, output_dir: str, endpoint_url: str):
        self.uri = output_dir.rstrip("/")
        self.s3 = storage.is_s3(output_dir)
        self.fs = storage.filesystem(output_dir, endpoint_url)
        self.path = storage.strip_scheme(output_dir).rstrip("/")

    def gen_uri(self, name: str) -> str:
        return storage.join(self.uri, GENERATIONS, name)

    def _read(self, *parts: str) -> bytes | None:
        p = storage.join(self.path, *parts)
        try:
            with self.fs.open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as e:
            raise UserError(
                f"{storage.join(self.uri, *parts)}: cannot read: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from e

    def latest(self) -> dict | None:
        self.fs.invalidate_cache()
        raw = self._read(LATEST)
        if raw is None:
            return None
        try:
            latest = json.loads(raw)
            assert isinstance(latest["generation"], str)
        except Exception as e:
            raise UserError(f"{storage.join(self.uri, LATEST)}: not a LATEST pointer ({e})") from e
        return latest

    def manifest(self, name: str) -> dict | None:
        """generation.json of a PUBLISHED generation (one with _SUCCESS), else None."""
        if self._read(GENERATIONS, name, storage.SUCCESS) is None:
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
                f"(no {storage.SUCCESS}); LATEST or generation.json names it"
            )
        width = int(manifest["id_width"])
        mapping = _read_table(self._read(GENERATIONS, name, export.MAPPING_PARQUET), self.gen_uri(name))
        retired = _read_table(self._read(GENERATIONS, name, RETIRED), self.gen_uri(name))
        return Generation(
            name,
            int(manifest["seq"]),
            manifest,
            _id_table(mapping, width),
            _retired_table(retired, width),
            self.model_bytes(name),
        )

    def model_bytes(self, name: str) -> bytes:
        model = self._read(GENERATIONS, name, export.MODEL)
        if model is None:
            raise UserError(f"{self.gen_uri(name)}: {export.MODEL} is missing")
        return model

    def move_latest(self, pointer: dict) -> None:
        """Atomic: a reader sees the old pointer or the new one, never a partial file."""
        data = (json.dumps(pointer, indent=2, sort_keys=True) + "\n").encode()
        dst = storage.join(self.path, LATEST)
        if self.s3:
            self.fs.pipe_file(dst, data)  # one PUT: S3 makes an object visible whole or not at all
            return
        tmp = storage.join(self.path, f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)


# --- parquet <-> tables --------------------------------------------------------------------


def _read_table(raw: bytes | None, where: str) -> pa.Table:
    if raw is None:
        raise UserError(f"{where}: generation files are missing")
    return pq.read_table(io.BytesIO(raw))


def _sid_column(table: pa.Table, width: int) -> np.ndarray:
    col = table.column("semantic_id").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, width)


def _np(table: pa.Table, name: str, dtype) -> np.ndarray:
    return table.column(name).to_numpy().astype(dtype)


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


def mapping_parquet(m: gen.IdTable) -> pa.Table:
    return pa.table(
        {
            "ItemID": pa.array(m.ids, pa.int64()),
            "semantic_id": _sid_array(m.sid),
            "fingerprint": pa.array(m.fp, pa.uint64()),
            "tokenizer": pa.array(m.tok, pa.uint64()),
        }
    )


def retired_parquet(r: gen.RetiredTable) -> pa.Table:
    names = [gen.REASON_NAMES[gen.REMOVED], gen.REASON_NAMES[gen.CHANGED]]
    reason = pa.DictionaryArray.from_arrays(pa.array((r.reason == gen.CHANGED).astype(np.int8)), names)
    return pa.table(
        {
            "semantic_id": _sid_array(r.sid),
            "ItemID": pa.array(r.ids, pa.int64()),
            "fingerprint": pa.array(r.fp, pa.uint64()),
            "tokenizer": pa.array(r.tok, pa.uint64()),
            "retired_seq": pa.array(r.seq, pa.int64()),
            "reason": reason,
        }
    )


def content_digest(a: gen.Assignment, name: str, seq: int, parent: str | None, tok_fp: int) -> str:
    """What a generation IS (IDs, fingerprints, retired list, tokenizer), independent of file
    encodings, timings and run ids: two runs with equal digests published the same thing."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([name, seq, parent, f"{tok_fp:016x}"]).encode())
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


# --- tokenizer -----------------------------------------------------------------------------


def tokenizer_fingerprint(tok) -> int:
    """64-bit hash of what makes the codes: mode, architecture and every tensor's bytes."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    payload = tok.payload()
    h.update(tok.mode.encode())
    if tok.mode == "kmeans":
        tensors = {"codebooks": payload["codebooks"]}
    else:
        tensors = payload["state_dict"]
        h.update(json.dumps(payload["model_args"], sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def _tokenizer_from_bytes(raw: bytes, where: str):
    import torch

    from semid_dist.tokenizer import Tokenizer

    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{where}: cannot load tokenizer: {str(e).splitlines()[0]}") from e
    return Tokenizer.from_payload(payload)


def _payload_bytes(tok) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(tok.payload(), buf)
    return buf.getvalue()


def _read_bytes(uri: str, endpoint_url: str) -> bytes:
    fs = storage.filesystem(uri, endpoint_url)
    try:
        with fs.open(storage.strip_scheme(uri), "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise UserError(f"{uri}: tokenizer file does not exist") from e
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{uri}: cannot read tokenizer: {why}") from e


# --- the run -------------------------------------------------------------------------------


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _resolved(cfg: Config, tok) -> Config:
    """The config as it really ran: mode, levels and codes per level of the tokenizer used."""
    k = {"n_embed": tok.n_codes} if tok.mode == "tiger" else {"n_clusters": tok.n_codes}
    return cfg.replace(mode=tok.mode, n_layers=tok.n_layers, **k)


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Write tonight's generation (or verify it, on a re-run). Returns the results dict."""
    cfg = cfg.replace(generation=cfg.generation or _today())
    log_path = setup_logging(cfg, log_dir)
    t_start, timer, ep, name = time.perf_counter(), train._Timer(), cfg.s3_endpoint_url, cfg.generation
    pub = None
    try:
        log.info(
            "semid_dist %s nightly: generation %s, data=%s output=%s",
            __version__,
            name,
            cfg.data_path,
            cfg.output_dir,
        )
        root = _Root(cfg.output_dir, ep)
        with timer.stage("previous"):
            latest = root.latest()
            existing = root.manifest(name)
            parent_name = existing["parent"] if existing else (latest["generation"] if latest else None)
            parent = root.load(parent_name) if parent_name else None
        seq = parent.seq + 1 if parent else 1
        log.info(
            "parent generation: %s; this is generation #%d%s",
            parent_name or "none (first night)",
            seq,
            " (already published: verifying)" if existing else "",
        )
        if parent and cfg.retrain and not existing and cfg.n_layers + 1 != parent.mapping.sid.shape[1]:
            raise UserError(
                f"invalid --n_layers={cfg.n_layers}: generation {parent_name} has "
                f"{parent.mapping.sid.shape[1] - 1} levels; IDs of one lineage keep their "
                "length (start a new --output_dir for a new layout)"
            )
        files, info, n_items = train.inspect_stage(cfg, timer)
        if not existing:
            pub = storage.Publisher(root.gen_uri(name), ep)
        where, ds = train.connect(cfg, info)

        if existing and (cfg.retrain or cfg.tokenizer or cfg.changed_policy != existing["changed_policy"]):
            log.warning(
                "generation %s is already published: verifying it with its own tokenizer and "
                "policy (--retrain/--tokenizer/--changed_policy ignored)",
                name,
            )
        if existing:
            cfg = cfg.replace(changed_policy=existing["changed_policy"])
        tokenizer, model_bytes, source, fit_info, scan = _pick_tokenizer(
            cfg, root, existing, parent, ds, info, n_items, pub, timer
        )
        cfg = _resolved(cfg, tokenizer)
        tok_fp = tokenizer_fingerprint(tokenizer)
        log.info(
            "tokenizer: %s (%s, %d levels x %d codes, fingerprint %016x)",
            source,
            tokenizer.mode,
            tokenizer.n_layers,
            tokenizer.n_codes,
            tok_fp,
        )
        if tokenizer.input_dim != info.dim:
            raise UserError(
                f"{cfg.data_path}: embeddings have {info.dim} dimensions, the tokenizer "
                f"({source}) expects {tokenizer.input_dim}"
            )
        width = tokenizer.n_layers + 1
        if parent is not None and parent.mapping.sid.shape[1] != width:
            raise UserError(
                f"tokenizer ({source}) has {tokenizer.n_layers} levels, generation "
                f"{parent_name} has {parent.mapping.sid.shape[1] - 1}; IDs of one lineage "
                "keep their length (start a new --output_dir for a new layout)"
            )

        with timer.stage("encode"):
            enc = passes.encode_catalog(
                info, tokenizer, ep, n_items, where, cfg.encode_batch_size, fingerprints=True
            )
            fp_N = enc.fp_N
            if scan is None:
                passes.check_unique_ids(enc.ids_N, files, ep)
        with timer.stage("assign"):
            prev = parent.mapping if parent else gen.IdTable.empty(width)
            retired = parent.retired if parent else gen.RetiredTable.empty(width)
            a = gen.assign(prev, retired, enc.ids_N, fp_N, enc.codes_NL, tok_fp, seq, cfg.changed_policy)
            digest = content_digest(a, name, seq, parent_name, tok_fp)
            quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum)
            quality["max_dedup_code"] = a.counts["max_dedup_code"]
            quality["published_ids"] = collision_stats(a.mapping.sid[:, :-1])
        counts = a.counts
        log.info(
            "generation %s: %d items: %d stable, %d new, %d changed (%d kept their ID), %d removed, "
            "%d reclaimed, %d fresh IDs, %d retired in all; collision rate before dedup %.3f%%",
            name,
            counts["items"],
            counts["stable"],
            counts["new"],
            counts["changed"],
            counts["changed_kept_id"],
            counts["removed"],
            counts["reclaimed"],
            counts["fresh_ids"],
            counts["retired_total"],
            100 * quality["collision_rate"],
        )
        manifest = {
            "name": name,
            "seq": seq,
            "parent": parent_name,
            "content_digest": digest,
            "tokenizer_fingerprint": f"{tok_fp:016x}",
            "id_width": width,
            "changed_policy": cfg.changed_policy,
            "counts": counts,
        }
        generation = {
            **{k: v for k, v in manifest.items() if k != "counts"},
            "tokenizer_source": source,
            "path": root.gen_uri(name),
        }
        results = {
            "semid_dist_version": __version__,
            "mode": tokenizer.mode,
            "config": cfg.to_dict(),
            "input": {"files": len(files), "rows": info.num_rows, "items": n_items, "dim": info.dim},
            "generation": generation,
            "counts": counts,
            "metrics": quality,
            "training": fit_info,
            "encode": {"device": where[0], "gpu_actors": where[1]},
            "timings_s": {},
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "run_id": pub.run_id if pub else None,
            "log_file": os.path.basename(log_path),
            "examples": train.example_items(a.mapping.ids, a.mapping.sid, cfg),
        }

        if existing:
            if existing.get("content_digest") != digest:
                raise UserError(
                    f"{root.gen_uri(name)}: generation {name} is already published with other "
                    f"content (digest {existing.get('content_digest')}, tonight {digest}): the "
                    "catalog or tokenizer changed since; publish it under another --generation"
                )
            generation["status"] = "verified"
            log.info("generation %s is already published with identical content: nothing rewritten", name)
        else:
            with timer.stage("export"):
                _write_generation(pub, a, model_bytes, manifest, cfg.dataset_name)
            results["timings_s"] = {**timer.stages, "total": round(time.perf_counter() - t_start, 3)}
            generation["status"] = "published"
            train.publish_run(
                pub,
                results,
                log_path,
                {"generation": name, "seq": seq, "items": n_items, "content_digest": digest},
            )
        generation["latest"] = _move_latest(root, name, seq, parent_name, digest, latest)
        results["timings_s"] = {**timer.stages, "total": round(time.perf_counter() - t_start, 3)}
        results["output_dir"] = root.gen_uri(name)
        results["log_path"] = log_path
        return results
    except BaseException:
        if pub is not None:
            pub.abort()
        raise
    finally:
        close_logging()


def _pick_tokenizer(
    cfg: Config,
    root: _Root,
    existing: dict | None,
    parent: Generation | None,
    ds,
    info: datalib.InputInfo,
    n_items: int,
    pub,
    timer,
):
    """Tonight's tokenizer: on a re-run the generation's own; --retrain (or a first night without
    --tokenizer) fits one with the training path; else --tokenizer; else the parent's copy.
    Returns (tokenizer, the bytes of final_model.pt to publish, source, fit info, scan|None)."""
    ep = cfg.s3_endpoint_url
    if existing:
        source = f"generation {cfg.generation} (re-run)"
        return (*_loaded(root.model_bytes(cfg.generation), source), source, {}, None)
    if cfg.retrain or (parent is None and not cfg.tokenizer):
        train.check_enough_items(cfg, n_items, info.dim)
        scan = train.scan_stage(cfg, info, n_items, timer)
        with timer.stage("fit"):
            tokenizer, fit_info = train._fit(cfg, ds, info, scan, n_items, pub)
        return tokenizer, _payload_bytes(tokenizer), "trained", fit_info, scan
    if cfg.tokenizer:
        return (*_loaded(_read_bytes(cfg.tokenizer, ep), cfg.tokenizer), cfg.tokenizer, {}, None)
    source = f"generation {parent.name}"
    return (*_loaded(parent.model_bytes, source), source, {}, None)


def _loaded(raw: bytes, where: str):
    return _tokenizer_from_bytes(raw, where), raw


def _write_generation(
    pub: storage.Publisher, a: gen.Assignment, model_bytes: bytes, manifest: dict, dataset: str
) -> None:
    m = a.mapping
    pub.write_text(export.MAPPING_JSON, export.mapping_json(m.ids, m.sid))
    pub.write_text(f"{dataset}.index.json", export.index_json(m.ids, m.sid))
    for fname, table in ((export.MAPPING_PARQUET, mapping_parquet(m)), (RETIRED, retired_parquet(a.retired))):
        with pub.open(fname, "wb") as f:
            pq.write_table(table, f, row_group_size=export.ROW_GROUP, compression="zstd")
    with pub.open(export.MODEL, "wb") as f:
        f.write(model_bytes)
    pub.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _move_latest(
    root: _Root, name: str, seq: int, parent: str | None, digest: str, latest_at_start: dict | None
) -> str:
    """LATEST moves forward only: from this generation's parent (or from nothing) to it."""
    now = root.latest()
    at = now["generation"] if now else None
    if at == name:
        return "unchanged (already names this generation)"
    if at != parent:
        if (latest_at_start or {}).get("generation") != at:
            raise UserError(
                f"{storage.join(root.uri, LATEST)} moved to {at} during this run (another "
                f"nightly run?); generation {name} is published but LATEST was not moved"
            )
        log.warning("LATEST names %s, a later generation than %s's parent: left as is", at, name)
        return f"unchanged (names {at})"
    root.move_latest(
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
