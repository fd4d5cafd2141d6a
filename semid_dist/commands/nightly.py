"""``semid nightly``: a new *generation* of semantic IDs that keeps stable IDs stable.

    semid nightly --data_path s3://bucket/catalog/ --output_dir s3://bucket/semid/ [--generation NAME]

One night: read LATEST (the parent generation), pick the tokenizer (--retrain: fit one as
``semid train`` does; else --tokenizer; else the parent's copy; first night without either: fit
one), ONE pass over the catalog that encodes every item and fingerprints its embedding, assign
IDs with ``math.generations.assign`` (the policy lives there), write and publish
generations/NAME, then move LATEST (``lineage.py``: the output root's layout). A crash at any
point before that leaves LATEST on the parent; readers go through LATEST.

Re-running a night whose generation is already published never rewrites it (downstream jobs
may have read it): the catalog is re-encoded with that generation's own tokenizer against its
own parent, and the content digest must match. Identical: nothing is written, except that
LATEST is moved to it if it still names its parent (the crash-after-publish case). Different
(tonight's catalog changed since): a one-line error; publish under another --generation name.
One writer at a time per output root (LATEST is re-read before it moves, to catch a second).

After a --retrain, kept IDs still carry the codes of the tokenizer that made them (the
mapping's ``tokenizer`` column names it by fingerprint); this generation's final_model.pt
reproduces exactly the IDs whose ``tokenizer`` equals generation.json's tokenizer_fingerprint.
"""

from __future__ import annotations

import io
import logging
import time

from semid_dist.catalog.encode import encode_catalog
from semid_dist.commands import train
from semid_dist.commands.encode import as_run
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.lineage import (
    Generation,
    Lineage,
    content_digest,
    move_latest,
    tokenizer_fingerprint,
    write_generation,
)
from semid_dist.math import generations as gen
from semid_dist.math.metrics import collision_stats, quality_report
from semid_dist.run import Run
from semid_dist.tokenizer import read_tokenizer, tokenizer_from_bytes

log = logging.getLogger("semid_dist")


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Write tonight's generation (or verify it, on a re-run). Returns the results dict."""
    cfg = cfg.replace(generation=cfg.generation or _today())
    name = cfg.generation
    with Run(cfg, log_dir) as r:
        log.info("semid_dist nightly: generation %s, data=%s output=%s", name, cfg.data_path, cfg.output_dir)
        root = Lineage(cfg.output_dir, r.store)
        with r.stage("previous"):
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
        catalog, n_items = r.inspect()
        if not existing:
            r.publisher(root.gen_uri(name))
        where = r.connect()

        if existing and (cfg.retrain or cfg.tokenizer or cfg.changed_policy != existing["changed_policy"]):
            log.warning(
                "generation %s is already published: verifying it with its own tokenizer and "
                "policy (--retrain/--tokenizer/--changed_policy ignored)",
                name,
            )
        if existing:
            cfg = cfg.replace(changed_policy=existing["changed_policy"])
        cfg = _lineage_collision_policy(cfg, existing or (parent.manifest if parent else None))
        tokenizer, model_bytes, source, fit_info, scan = _pick_tokenizer(
            r, root, existing, parent, catalog, n_items
        )
        r.name_log_by_mode(tokenizer.mode)
        cfg = as_run(cfg, tokenizer)
        tok_fp = tokenizer_fingerprint(tokenizer)
        log.info(
            "tokenizer: %s (%s, %d levels x %d codes, fingerprint %016x)",
            source,
            tokenizer.mode,
            tokenizer.n_layers,
            tokenizer.n_codes,
            tok_fp,
        )
        if tokenizer.input_dim != catalog.dim:
            raise UserError(
                f"{cfg.data_path}: embeddings have {catalog.dim} dimensions, the tokenizer "
                f"({source}) expects {tokenizer.input_dim}"
            )
        width = tokenizer.n_layers + 1
        if parent is not None and parent.mapping.sid.shape[1] != width:
            raise UserError(
                f"tokenizer ({source}) has {tokenizer.n_layers} levels, generation "
                f"{parent_name} has {parent.mapping.sid.shape[1] - 1}; IDs of one lineage "
                "keep their length (start a new --output_dir for a new layout)"
            )

        with r.stage("encode"):
            extras = train.extras(cfg, n_items, fingerprints=True)
            enc = encode_catalog(catalog, tokenizer, n_items, where, cfg.encode_batch_size, extras)
            if scan is None:
                catalog.check_unique_ids(enc.ids_N)
        with r.stage("assign"):
            prev = parent.mapping if parent else gen.IdTable.empty(width)
            retired = parent.retired if parent else gen.RetiredTable.empty(width)
            a = gen.assign(
                prev,
                retired,
                enc.ids_N,
                enc.fp_N,
                enc.codes_NL,
                tok_fp,
                seq,
                cfg.changed_policy,
                enc.cand_NK,
                enc.cand_err_NK,
            )
            digest = content_digest(a, name, seq, parent_name, tok_fp)
            quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum)
            quality["max_dedup_code"] = a.counts["max_dedup_code"]
            quality["published_ids"] = collision_stats(a.mapping.sid[:, :-1])
            fresh = a.status_N == gen.FRESH
            train.add_quality(quality, enc, a.mapping.sid[:, :-1])
            quality["collisions"] = {
                "policy": cfg.collision_policy,
                "rate_before": quality["collision_rate"],
                "rate_after": quality["published_ids"]["collision_rate"],
                "moved": int((fresh & (a.mapping.sid[:, :-1] != enc.codes_NL).any(axis=1)).sum()),
                "suffix_items": int((a.mapping.sid[:, -1] > 0).sum()),
            }
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
            "collision_policy": cfg.collision_policy,
            "counts": counts,
        }
        generation = {
            **{k: v for k, v in manifest.items() if k != "counts"},
            "tokenizer_source": source,
            "path": root.gen_uri(name),
        }
        results = r.results(
            cfg,
            tokenizer.mode,
            catalog,
            n_items,
            quality,
            fit_info,
            where,
            a.mapping.ids,
            a.mapping.sid,
            generation=generation,
            counts=counts,
        )
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
            with r.stage("export"):
                write_generation(r.pub, a, model_bytes, manifest, cfg.dataset_name, tokenizer.n_codes)
                train.write_report(r, results)
            generation["status"] = "published"
            r.publish(results, {"generation": name, "seq": seq, "items": n_items, "content_digest": digest})
        generation["latest"] = move_latest(root, name, seq, parent_name, digest, latest)
        results["timings_s"] = r.timings()
        results["output_dir"] = root.gen_uri(name)
        results["log_path"] = r.log_path
        return results


def _pick_tokenizer(
    r: Run, root: Lineage, existing: dict | None, parent: Generation | None, catalog, n_items: int
):
    """Tonight's tokenizer: on a re-run the generation's own; --retrain (or a first night without
    --tokenizer) fits one as ``semid train`` does; else --tokenizer; else the parent's copy.
    Returns (tokenizer, the bytes of final_model.pt to publish, source, fit info, scan|None)."""
    cfg = r.cfg
    if existing:
        source = f"generation {cfg.generation} (re-run)"
        raw = root.model_bytes(cfg.generation)
        return tokenizer_from_bytes(raw, source), raw, source, {}, None
    if cfg.retrain or (parent is None and not cfg.tokenizer):
        train.check_enough_items(cfg, n_items, catalog.dim)
        scan = train.scan_stage(r, catalog, n_items)
        tokenizer, fit_info = train.fit_stage(r, catalog, n_items, scan)
        return tokenizer, _payload_bytes(tokenizer), "trained", fit_info, scan
    if cfg.tokenizer:
        tokenizer, raw = read_tokenizer(cfg.tokenizer, r.store)
        return tokenizer, raw, cfg.tokenizer, {}, None
    source = f"generation {parent.name}"
    return tokenizer_from_bytes(parent.model_bytes, source), parent.model_bytes, source, {}, None


def _payload_bytes(tok) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(tok.payload(), buf)
    return buf.getvalue()


def _lineage_collision_policy(cfg: Config, first: dict | None) -> Config:
    """A lineage keeps the collision policy of its first night (generations written before the
    policy existed used suffix): later nights inherit it, whatever --collision_policy says."""
    if first is None:
        return cfg
    policy = first.get("collision_policy", "suffix")
    if cfg.collision_policy != policy:
        log.warning(
            "--collision_policy %s ignored: this lineage uses %s since its first night",
            cfg.collision_policy,
            policy,
        )
    return cfg.replace(collision_policy=policy)
