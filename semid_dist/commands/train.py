"""``semid train``: inputs -> scan pass -> fit -> encode pass -> dedup -> export -> publish.

The encode-and-export half (``export_ids``) is shared with ``semid encode``, and the scan and
fit stages (``scan_stage``, ``fit_stage``) with ``semid nightly``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from semid_dist import export, modes
from semid_dist.catalog.encode import EncodeResult, Extras, encode_catalog
from semid_dist.catalog.scan import ScanResult, scan_pass
from semid_dist.catalog.schema import Catalog
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.dedup import row_groups, suffix_dedup
from semid_dist.math.metrics import collision_stats, quality_report
from semid_dist.run import Run
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Train a tokenizer, encode the catalog, publish the outputs. Returns training_results."""
    with Run(cfg, log_dir) as r:
        catalog, n_items = r.inspect()
        check_enough_items(cfg, n_items, catalog.dim)
        r.publisher(cfg.output_dir)
        where = r.connect()
        scan = scan_stage(r, catalog, n_items)
        tokenizer, fit_info = fit_stage(r, catalog, n_items, scan)
        del scan  # its ItemIDs and sample: not needed for the encode pass and after
        return export_ids(r, cfg, catalog, n_items, where, tokenizer, fit_info, scanned=True)


def check_enough_items(cfg: Config, n_items: int, dim: int) -> None:
    """Before fitting: a codebook cannot have more codes than there are items to fit it on, and
    the mode's sample must fit its memory cap (modes.sample_target raises if not)."""
    if cfg.n_codes > n_items:
        flag = "n_embed" if cfg.mode == "tiger" else "n_clusters"
        raise UserError(f"--{flag} {cfg.n_codes} is larger than the number of items ({n_items})")
    modes.sample_target(cfg, dim, n_items)


def scan_stage(r: Run, catalog: Catalog, n_items: int) -> ScanResult:
    """The scan pass before a fit (every row validated, the mode's hash sample kept), and no
    ItemID twice."""
    cfg = r.cfg
    target = modes.sample_target(cfg, catalog.dim, n_items)
    modes.announce_sample(cfg, catalog.dim, n_items, target)
    with r.stage("scan"):
        scan = scan_pass(
            catalog, cfg.seed, target, n_items, maxabs=modes.wants_maxabs(cfg, catalog.dim, n_items)
        )
        catalog.check_unique_ids(scan.ids_N)
    return scan


def fit_stage(r: Run, catalog: Catalog, n_items: int, scan: ScanResult) -> tuple[Tokenizer, dict]:
    with r.stage("fit"):
        return modes.fit(modes.FitJob(r.cfg, catalog, n_items, scan, r.pub))


def export_ids(
    r: Run,
    cfg: Config,
    catalog: Catalog,
    n_items: int,
    where: tuple[str, int],
    tokenizer: Tokenizer,
    fit_info: dict,
    scanned: bool,
) -> dict:
    """Encode every item with tokenizer, dedup, write the outputs and publish them; returns the
    results. Without a scan pass before (scanned=False), duplicates are checked on the encode
    pass's ItemIDs."""
    with r.stage("encode"):
        enc = encode_catalog(catalog, tokenizer, n_items, where, cfg.encode_batch_size, extras(cfg, n_items))
        if not scanned:
            catalog.check_unique_ids(enc.ids_N)
    with r.stage("dedup"):
        codes_NL, dedup_N, collisions, sizes_G = apply_policy(cfg, enc)
        sid_NM = export.semantic_ids(codes_NL, dedup_N)
        # the tokenizer's codes as encoded; what the collision policy changed is in "collisions"
        quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum, sizes_G)
        quality["max_dedup_code"] = int(dedup_N.max()) if dedup_N.size else 0
        quality["collisions"] = collisions
        if len(sid_NM) <= CHECK_UNIQUE_UP_TO:  # above, unique by construction; the check costs a sort
            assert row_groups(sid_NM)[1].all(), "dedup left a duplicate ID"
        del dedup_N  # in sid_NM now
        add_group_sizes(quality, enc.codes_NL, codes_NL, sizes_G)  # before the export: their sorts' memory
    figures = background(add_coherence, quality, enc, codes_NL)  # overlaps the export's writing
    with r.stage("export"):
        export.write_mappings(r.pub, enc.ids_N, sid_NM, cfg.dataset_name)
        export.write_retrieval_files(r.pub, sid_NM, tokenizer.n_codes)
        export.write_torch(r.pub, export.MODEL, tokenizer.payload())
    with r.stage("quality"):  # what the figures add to the wall time, beyond the export
        figures()
    results = r.results(cfg, cfg.mode, catalog, n_items, quality, fit_info, where, enc.ids_N, sid_NM)
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


QUALITY_SAMPLE = 10_000  # items whose embeddings the encode pass keeps for the semantic coherence
CHECK_UNIQUE_UP_TO = 1_000_000  # catalogs up to this size re-check that every published ID is unique


def extras(cfg: Config, n_items: int, fingerprints: bool = False) -> Extras:
    """What the encode pass keeps besides the codes: candidates under relocate, the quality
    sample always."""
    k = min(cfg.relocate_candidates, cfg.n_codes) if cfg.collision_policy == "relocate" else 0
    return Extras(fingerprints, k, QUALITY_SAMPLE, cfg.seed, n_items)


def apply_policy(cfg: Config, enc: EncodeResult) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray | None]:
    """The codes and dedup codes of every item under --collision_policy, what the policy did
    (training_results.json's metrics.collisions), and under suffix the sizes of the groups."""
    from semid_dist.math.relocate import relocate

    t0 = time.perf_counter()
    n = len(enc.ids_N)
    err_before = enc.sq_err_sum / enc.sq_norm_sum if enc.sq_norm_sum > 0 else 0.0
    if cfg.collision_policy == "suffix":
        dedup_N, sizes_G = suffix_dedup(enc.codes_NL)  # ids_N is sorted: one sort does it all
        rate = 1.0 - len(sizes_G) / n if n else 0.0
        return (
            enc.codes_NL,
            dedup_N,
            {
                "policy": "suffix",
                "rate_before": rate,
                "rate_after": rate,
                "moved": 0,
                "suffix_items": int(n - len(sizes_G)),
                "error_before": err_before,
                "error_after": err_before,
                "seconds": round(time.perf_counter() - t0, 3),
            },
            sizes_G,
        )
    rate_before = collision_stats(enc.codes_NL)["collision_rate"]
    rel = relocate(enc.ids_N, enc.codes_NL, enc.cand_NK, enc.cand_err_NK)
    err_after = (enc.sq_err_sum + rel.err_delta) / enc.sq_norm_sum if enc.sq_norm_sum > 0 else 0.0
    return (
        rel.codes_NL,
        rel.dedup_N,
        {
            "policy": "relocate",
            "candidates": int(enc.cand_NK.shape[1]),
            "rate_before": rate_before,
            "rate_after": collision_stats(rel.codes_NL)["collision_rate"],
            "moved": int(rel.moved_N.sum()),
            "suffix_items": int(rel.suffix_N.sum()),
            "error_before": err_before,
            "error_after": float(err_after),
            "seconds": round(time.perf_counter() - t0, 3),
        },
        None,
    )


def log_policy(c: dict) -> None:
    if c["policy"] == "suffix":
        log.info("collision policy suffix: %d items carry a dedup code > 0", c["suffix_items"])
        return
    log.info(
        "collision policy relocate (%d candidates): collision rate %.3f%% -> %.3f%%, %d items moved, "
        "%d still need a suffix, relative reconstruction error %.4f -> %.4f, %.2f s",
        c["candidates"],
        100 * c["rate_before"],
        100 * c["rate_after"],
        c["moved"],
        c["suffix_items"],
        c["error_before"],
        c["error_after"],
        c["seconds"],
    )


def background(fn, *args):
    """Run fn(*args) on a thread; returns a function that waits for it and re-raises its error.
    The quality figures are numpy and faiss, which release the GIL: on a thread they use the cores
    the export's formatting and writing (one core) leaves idle."""
    import threading

    box: dict = {}

    def target():
        try:
            fn(*args)
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    t = threading.Thread(target=target, name="semid-quality", daemon=True)
    t.start()

    def wait() -> None:
        t.join()
        if "error" in box:
            raise box["error"]

    return wait


def add_quality(quality: dict, enc: EncodeResult, codes_NL: np.ndarray) -> None:
    """The quality report's figures: group sizes before and after the collision policy, and
    the semantic coherence of the published codes on the encode pass's hash sample."""
    add_group_sizes(quality, enc.codes_NL, codes_NL)
    add_coherence(quality, enc, codes_NL)


def add_group_sizes(
    quality: dict, before_NL: np.ndarray, after_NL: np.ndarray, sizes_G: np.ndarray | None = None
) -> None:
    from semid_dist.math.quality import group_size_histogram, histogram_of_sizes

    before = group_size_histogram(before_NL) if sizes_G is None else histogram_of_sizes(sizes_G)
    after = before if after_NL is before_NL else group_size_histogram(after_NL)
    quality["group_sizes"] = {"before": before, "after": after}


def add_coherence(quality: dict, enc: EncodeResult, codes_NL: np.ndarray) -> None:
    """The semantic coherence of the published codes on the encode pass's hash sample."""
    from semid_dist.math.quality import coherence

    t0 = time.perf_counter()
    if enc.sample_ids is not None and len(enc.sample_ids):
        rows = np.searchsorted(enc.ids_N, enc.sample_ids)
        quality["coherence"] = coherence(enc.sample_x, codes_NL[rows])
        c = quality["coherence"]
        if c["knn_same_first"] is not None:
            log.info(
                "semantic coherence (%d items, %d neighbours): %.1f%% share the first code (random "
                "pairs %.1f%%), %.1f%% the first two (random %.2f%%)",
                c["sample"],
                c["k"],
                100 * c["knn_same_first"],
                100 * c["random_same_first"],
                100 * c["knn_same_first_two"],
                100 * c["random_same_first_two"],
            )
    enc.sample_x = None  # up to 30 MB the driver no longer needs
    quality["coherence_seconds"] = round(time.perf_counter() - t0, 3)


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
    from semid_dist.run import peak_rss_gb

    peak = max([peak_rss_gb(), *r.stage_peaks.values()])
    return {
        "peak_rss_gb": round(peak, 3),
        "bytes_per_item": round(peak * 1e9 / max(n_items, 1), 1),
        "stage_peak_rss_gb": dict(r.stage_peaks),
    }
