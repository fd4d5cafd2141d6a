"""A catalog's IDs end to end, once the tokenizer exists (``semid train`` after its fit,
``semid encode`` with a given one): the encode pass, the collision policy, the quality figures,
the export, the report and the publish."""

from __future__ import annotations

import logging

from semid_dist import export
from semid_dist.catalog.encode import Extras, encode_catalog
from semid_dist.catalog.schema import Catalog
from semid_dist.config import Config
from semid_dist.math.dedup import row_groups
from semid_dist.math.metrics import quality_report
from semid_dist.pipeline.collisions import apply_policy, log_policy
from semid_dist.pipeline.quality import add_coherence, add_group_sizes, background
from semid_dist.pipeline.relocation import CandidateSpool
from semid_dist.run import Run, peak_rss_gb
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")

QUALITY_SAMPLE = 10_000  # items whose embeddings the encode pass keeps for the semantic coherence
CHECK_UNIQUE_UP_TO = 1_000_000  # catalogs up to this size re-check that every published ID is unique


def extras(cfg: Config, n_items: int, fingerprints: bool = False) -> Extras:
    """What the encode pass keeps besides the codes: candidates under relocate, the quality
    sample always, and for the nightly job each embedding's fingerprint."""
    k = min(cfg.relocate_candidates, cfg.n_codes) if cfg.collision_policy == "relocate" else 0
    return Extras(fingerprints, k, QUALITY_SAMPLE, cfg.seed, n_items)


def export_ids(
    r: Run,
    catalog: Catalog,
    n_items: int,
    where: tuple[str, int],
    tokenizer: Tokenizer,
    fit_info: dict,
    scanned: bool,
) -> dict:
    """Encode every item with tokenizer, apply the collision policy, write the outputs and
    publish them; returns the results. Without a scan pass before (scanned=False), duplicates
    are checked on the encode pass's ItemIDs."""
    cfg = r.cfg
    with r.stage("encode"):
        ext = extras(cfg, n_items)
        spool = CandidateSpool.of(cfg, ext, tokenizer.n_layers, catalog.string_ids, n_items)
        keep = spool.take if spool else None
        enc = encode_catalog(catalog, tokenizer, n_items, where, cfg.encode_batch_size, ext, keep)
        if not scanned:
            enc.check_unique(catalog)
    with r.stage("dedup"):
        codes_NL, dedup_N, collisions, sizes_G = apply_policy(cfg, enc, spool)
        del spool
        sid_NM = export.semantic_ids(codes_NL, dedup_N)
        # the tokenizer's codes as encoded; what the collision policy changed is in "collisions"
        quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum, sizes_G)
        quality["max_dedup_code"] = int(dedup_N.max()) if dedup_N.size else 0
        quality["collisions"] = collisions.to_dict()
        if len(sid_NM) <= CHECK_UNIQUE_UP_TO:  # above, unique by construction; the check costs a sort
            assert row_groups(sid_NM)[1].all(), "dedup left a duplicate ID"
        del dedup_N  # in sid_NM now
        add_group_sizes(quality, enc.codes_NL, codes_NL, sizes_G)  # before the export: their sorts' memory
    figures = background(add_coherence, quality, enc, codes_NL)  # overlaps the export's writing
    with r.stage("export"):
        export.write_mappings(r.pub, enc.item_ids(), sid_NM, cfg.dataset_name, catalog.id_type)
        export.write_retrieval_files(r.pub, sid_NM, tokenizer.n_codes)
        export.write_torch(r.pub, export.MODEL, tokenizer.payload())
    with r.stage("quality"):  # what the figures add to the wall time, beyond the export
        figures()
    results = r.results(catalog, n_items, quality, fit_info, where, enc.item_ids(), sid_NM)
    log.info(
        "collision rate before dedup %.3f%%, max bucket %d, codes used per level %s, "
        "relative reconstruction error %.4f",
        100 * quality["collision_rate"],
        quality["max_bucket"],
        [lv["codes_used"] for lv in quality["levels"]],
        quality["relative_reconstruction_error"],
    )
    log_policy(collisions)
    write_report(r, results)
    results["driver"] = driver_memory(r, n_items)
    r.publish(results, {"mode": cfg.mode, "items": n_items})
    results["output_dir"] = cfg.output_dir
    results["log_path"] = r.log_path
    return results


def write_report(r: Run, results: dict) -> None:
    """quality_report.html, published with the other outputs."""
    from semid_dist import report_html

    with r.stage("report"):
        results["timings_s"] = r.timings()  # so far; publish() records the final ones
        report_html.write(r.pub, results)


def driver_memory(r: Run, n_items: int) -> dict:
    """The driver process's peak resident memory in each stage and over the run so far, and that
    over the items (an upper bound on the driver's memory per item: it includes the interpreter,
    torch and Ray). Between two catalog sizes, the growth of a stage's peak is its memory per
    item (BENCHMARKS.md)."""
    peak = max([peak_rss_gb(), *r.stage_peaks.values()])
    return {
        "peak_rss_gb": round(peak, 3),
        "bytes_per_item": round(peak * 1e9 / max(n_items, 1), 1),
        "stage_peak_rss_gb": dict(r.stage_peaks),
    }
