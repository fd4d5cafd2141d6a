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

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa

from semid_dist.catalog.encode import EncodeResult, encode_catalog
from semid_dist.catalog.names import common_ranks
from semid_dist.catalog.schema import Catalog
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
from semid_dist.pipeline.collisions import CollisionSummary
from semid_dist.pipeline.fit import as_run, check_enough_items, fit_stage, payload_bytes, scan_stage
from semid_dist.pipeline.ids import extras, write_report
from semid_dist.pipeline.quality import add_quality
from semid_dist.pipeline.relocation import CandidateSpool, NotStable
from semid_dist.run import Run
from semid_dist.tokenizer import Tokenizer, read_tokenizer, tokenizer_from_bytes

log = logging.getLogger("semid_dist")


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


@dataclass
class Night:
    """What tonight starts from, read before its first step."""

    root: Lineage
    name: str
    latest: dict | None  # the LATEST pointer as read
    existing: dict | None  # this generation's manifest when it is already published (a re-run)
    parent: Generation | None

    @property
    def parent_name(self) -> str | None:
        return self.parent.name if self.parent else None

    @property
    def seq(self) -> int:
        return self.parent.seq + 1 if self.parent else 1


@dataclass
class NightTokenizer:
    tokenizer: Tokenizer
    model_bytes: bytes  # what generations/NAME/final_model.pt holds
    source: str  # where it came from, for the log and generation.json
    fit_info: dict
    scanned: bool  # a scan pass ran (it checked that no ItemID appears twice)

    @cached_property
    def fingerprint(self) -> int:
        return tokenizer_fingerprint(self.tokenizer)


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Write tonight's generation (or verify it, on a re-run). Returns the results dict."""
    cfg = cfg.replace(generation=cfg.generation or _today())
    with Run(cfg, log_dir) as r:
        log.info(
            "semid_dist nightly: generation %s, data=%s output=%s",
            cfg.generation,
            cfg.data_path,
            cfg.output_dir,
        )
        night = read_parent(r)
        given = given_tokenizer(r, night)  # None: tonight fits one
        r.use_config(resolve_config(cfg, night, given))  # the night's config, once, before any step
        catalog, n_items = r.inspect()
        if not night.existing:
            r.publisher(night.root.gen_uri(night.name))
        where = r.connect()
        tok = given or train_tokenizer(r, catalog, n_items)
        check_tokenizer(r.cfg, night, tok, catalog)
        enc, spool = encode(r, catalog, n_items, where, tok, night.parent)
        tonight = assign(r, night, enc, spool, tok, catalog.id_type)
        return publish(r, night, tok, tonight, (catalog, n_items, where))


def read_parent(r: Run) -> Night:
    """LATEST, this generation's manifest if it is already published, and the parent."""
    cfg = r.cfg
    root = Lineage(cfg.output_dir, r.store)
    with r.stage("previous"):
        latest = root.latest()
        existing = root.manifest(cfg.generation)
        parent_name = existing["parent"] if existing else (latest["generation"] if latest else None)
        parent = root.load(parent_name) if parent_name else None
    night = Night(root, cfg.generation, latest, existing, parent)
    log.info(
        "parent generation: %s; this is generation #%d%s",
        parent_name or "none (first night)",
        night.seq,
        " (already published: verifying)" if existing else "",
    )
    if parent and cfg.retrain and not existing and cfg.n_layers + 1 != parent.mapping.sid.shape[1]:
        raise UserError(
            f"invalid --n_layers={cfg.n_layers}: generation {parent_name} has "
            f"{parent.mapping.sid.shape[1] - 1} levels; IDs of one lineage keep their "
            "length (start a new --output_dir for a new layout)"
        )
    return night


def given_tokenizer(r: Run, night: Night) -> NightTokenizer | None:
    """Tonight's tokenizer when it exists already: on a re-run the generation's own; else
    --tokenizer; else the parent's copy. None when tonight fits one (--retrain, or a first night
    without --tokenizer), as ``semid train`` does."""
    cfg = r.cfg
    if night.existing:
        source = f"generation {night.name} (re-run)"
        raw = night.root.model_bytes(night.name)
        return NightTokenizer(tokenizer_from_bytes(raw, source), raw, source, {}, False)
    if cfg.retrain or (night.parent is None and not cfg.tokenizer):
        return None
    if cfg.tokenizer:
        tokenizer, raw = read_tokenizer(cfg.tokenizer, r.store)
        return NightTokenizer(tokenizer, raw, cfg.tokenizer, {}, False)
    source = f"generation {night.parent.name}"
    raw = night.parent.model_bytes
    return NightTokenizer(tokenizer_from_bytes(raw, source), raw, source, {}, False)


def resolve_config(cfg: Config, night: Night, given: NightTokenizer | None) -> Config:
    """The night's config: a re-run keeps its generation's changed policy; a lineage keeps the
    collision policy of its first night (generations written before the policy existed used
    suffix), whatever the flags say; a given tokenizer brings its mode, levels and sizes."""
    existing = night.existing
    if existing and (cfg.retrain or cfg.tokenizer or cfg.changed_policy != existing["changed_policy"]):
        log.warning(
            "generation %s is already published: verifying it with its own tokenizer and "
            "policy (--retrain/--tokenizer/--changed_policy ignored)",
            night.name,
        )
    if existing:
        cfg = cfg.replace(changed_policy=existing["changed_policy"])
    first = existing or (night.parent.manifest if night.parent else None)
    if first is not None:
        policy = first.get("collision_policy", "suffix")
        if cfg.collision_policy != policy:
            log.warning(
                "--collision_policy %s ignored: this lineage uses %s since its first night",
                cfg.collision_policy,
                policy,
            )
        cfg = cfg.replace(collision_policy=policy)
    return as_run(cfg, given.tokenizer) if given else cfg


def train_tokenizer(r: Run, catalog: Catalog, n_items: int) -> NightTokenizer:
    """Fit tonight's tokenizer with the night's config, as ``semid train`` does."""
    check_enough_items(r.cfg, n_items, catalog.dim)
    scan = scan_stage(r, catalog, n_items)
    tokenizer, fit_info = fit_stage(r, catalog, n_items, scan)
    return NightTokenizer(tokenizer, payload_bytes(tokenizer), "trained", fit_info, True)


def check_tokenizer(cfg: Config, night: Night, tok: NightTokenizer, catalog: Catalog) -> None:
    """The tokenizer fits the catalog and the lineage, and the catalog's ItemIDs are of the
    lineage's type."""
    kind = "string" if catalog.string_ids else "integer"
    if night.parent is not None and night.parent.id_kind != kind:
        raise UserError(
            f"{cfg.data_path}: ItemIDs are {kind}s, generation {night.parent.name}'s are "
            f"{night.parent.id_kind}s; a lineage keeps its ItemID type (start a new --output_dir)"
        )
    t = tok.tokenizer
    log.info(
        "tokenizer: %s (%s, %d levels x %d codes, fingerprint %016x)",
        tok.source,
        t.mode,
        t.n_layers,
        t.n_codes,
        tok.fingerprint,
    )
    if t.input_dim != catalog.dim:
        raise UserError(
            f"{cfg.data_path}: embeddings have {catalog.dim} dimensions, the tokenizer "
            f"({tok.source}) expects {t.input_dim}"
        )
    parent = night.parent
    if parent is not None and parent.mapping.sid.shape[1] != t.n_layers + 1:
        raise UserError(
            f"tokenizer ({tok.source}) has {t.n_layers} levels, generation "
            f"{parent.name} has {parent.mapping.sid.shape[1] - 1}; IDs of one lineage "
            "keep their length (start a new --output_dir for a new layout)"
        )


def encode(
    r: Run,
    catalog: Catalog,
    n_items: int,
    where: tuple[str, int],
    tok: NightTokenizer,
    parent: Generation | None,
) -> tuple[EncodeResult, CandidateSpool | None]:
    """One pass: every item's codes and its embedding's fingerprint. Under relocate the
    candidates go to the spool's relocation tasks, and the driver keeps those of the items that
    are not stable against the parent (only they can need a fresh ID)."""
    cfg = r.cfg
    hold = None if parent is None else NotStable(parent.mapping.ids, parent.mapping.fp, parent.names)
    ext = extras(cfg, n_items, fingerprints=True)
    spool = CandidateSpool.of(cfg, ext, tok.tokenizer.n_layers, catalog.string_ids, n_items, hold)
    with r.stage("encode"):
        enc = encode_catalog(
            catalog, tok.tokenizer, n_items, where, cfg.encode_batch_size, ext, spool.take if spool else None
        )
        if not tok.scanned:
            enc.check_unique(catalog)
    return enc, spool


@dataclass
class Tonight:
    a: gen.Assignment
    quality: dict
    digest: str  # of the generation's content (a re-run must match it)
    names: tuple | None = None  # string ItemIDs of the mapping's and the retired list's rows


def assign(
    r: Run,
    night: Night,
    enc: EncodeResult,
    spool: CandidateSpool | None,
    tok: NightTokenizer,
    id_type: pa.DataType,
) -> Tonight:
    """Tonight's IDs against the parent's (math/generations.py), the quality figures and the
    content digest. spool: the encode pass's candidates (relocate). id_type: the catalog's
    ItemID type (string ItemIDs are written as it)."""
    tok_fp = tok.fingerprint
    width = tok.tokenizer.n_layers + 1
    parent = night.parent
    with r.stage("assign"):
        prev = parent.mapping if parent else gen.IdTable.empty(width)
        retired = parent.retired if parent else gen.RetiredTable.empty(width)
        ids_N, union = enc.ids_N, None
        if enc.names is not None:  # one rank space for the parent's, the retired and tonight's
            none = pa.array([], pa.large_string())
            union, (prev_r, retired_r, ids_N) = common_ranks(
                parent.names if parent else none, parent.retired_names if parent else none, enc.names
            )
            prev, retired = dataclasses.replace(prev, ids=prev_r), dataclasses.replace(retired, ids=retired_r)
        a = gen.assign(
            prev,
            retired,
            ids_N,
            enc.fp_N,
            enc.codes_NL,
            tok.fingerprint,
            night.seq,
            r.cfg.changed_policy,
            relocated=spool.relocated(enc.codes_NL, enc.stream_order) if spool else None,
        )
        enc.stream_order = None
        names = None
        if union is not None:
            names = (union.take(a.mapping.ids).cast(id_type), union.take(a.retired.ids).cast(id_type))
        digest = content_digest(a, night.name, night.seq, night.parent_name, tok_fp, names)
        quality = quality_report(enc.codes_NL, tok.tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum)
        quality["max_dedup_code"] = a.counts["max_dedup_code"]
        quality["published_ids"] = collision_stats(a.mapping.sid[:, :-1])
        add_quality(quality, enc, a.mapping.sid[:, :-1])
        quality["collisions"] = CollisionSummary.of_generation(
            r.cfg.collision_policy,
            enc.codes_NL,
            a.mapping.sid,
            a.status_N == gen.FRESH,
            quality["collision_rate"],
            quality["published_ids"]["collision_rate"],
        ).to_dict()
    return Tonight(a, quality, digest, names)


def publish(r: Run, night: Night, tok: NightTokenizer, tonight: Tonight, inputs: tuple) -> dict:
    """Publish generations/NAME (or verify it on a re-run), then move LATEST. inputs: the
    catalog, the item count and where the encode pass ran."""
    catalog, n_items, where = inputs
    a, quality, digest = tonight.a, tonight.quality, tonight.digest
    cfg, name, counts = r.cfg, night.name, a.counts
    _log_counts(name, counts, quality)
    manifest = {
        "name": name,
        "seq": night.seq,
        "parent": night.parent_name,
        "content_digest": digest,
        "tokenizer_fingerprint": f"{tok.fingerprint:016x}",
        "id_width": tok.tokenizer.n_layers + 1,
        "changed_policy": cfg.changed_policy,
        "collision_policy": cfg.collision_policy,
        "counts": counts,
    }
    generation = {
        **{k: v for k, v in manifest.items() if k != "counts"},
        "tokenizer_source": tok.source,
        "path": night.root.gen_uri(name),
    }
    items = a.mapping.ids if tonight.names is None else tonight.names[0]
    results = r.results(
        catalog,
        n_items,
        quality,
        tok.fit_info,
        where,
        items,
        a.mapping.sid,
        generation=generation,
        counts=counts,
    )
    if night.existing:
        if night.existing.get("content_digest") != digest:
            raise UserError(
                f"{night.root.gen_uri(name)}: generation {name} is already published with other "
                f"content (digest {night.existing.get('content_digest')}, tonight {digest}): the "
                "catalog or tokenizer changed since; publish it under another --generation"
            )
        generation["status"] = "verified"
        log.info("generation %s is already published with identical content: nothing rewritten", name)
    else:
        with r.stage("export"):
            write_generation(
                r.pub, a, tok.model_bytes, manifest, cfg.dataset_name, tok.tokenizer.n_codes, tonight.names
            )
            write_report(r, results)
        generation["status"] = "published"
        r.publish(results, {"generation": name, "seq": night.seq, "items": n_items, "content_digest": digest})
    generation["latest"] = move_latest(night.root, name, night.seq, night.parent_name, digest, night.latest)
    results["timings_s"] = r.timings()
    results["output_dir"] = night.root.gen_uri(name)
    results["log_path"] = r.log_path
    return results


def _log_counts(name: str, counts: dict, quality: dict) -> None:
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
