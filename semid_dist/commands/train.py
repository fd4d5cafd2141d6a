"""``semid train``: inputs -> scan pass -> fit -> encode pass -> dedup -> export -> publish.

The encode-and-export half (``export_ids``) is shared with ``semid encode``, and the scan and
fit stages (``scan_stage``, ``fit_stage``) with ``semid nightly``.
"""

from __future__ import annotations

import logging

from semid_dist import export, modes
from semid_dist.catalog.encode import encode_catalog
from semid_dist.catalog.scan import ScanResult, scan_pass
from semid_dist.catalog.schema import Catalog
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.dedup import dedup_codes, row_groups
from semid_dist.math.metrics import quality_report
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
        enc = encode_catalog(catalog, tokenizer, n_items, where, cfg.encode_batch_size)
        if not scanned:
            catalog.check_unique_ids(enc.ids_N)
    with r.stage("dedup"):
        dedup_N = dedup_codes(enc.ids_N, enc.codes_NL)
        sid_NM = export.semantic_ids(enc.codes_NL, dedup_N)
        quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum)
        quality["max_dedup_code"] = int(dedup_N.max()) if dedup_N.size else 0
        assert row_groups(sid_NM)[1].all(), "dedup left a duplicate ID"
    with r.stage("export"):
        export.write_mappings(r.pub, enc.ids_N, sid_NM, cfg.dataset_name)
        export.write_retrieval_files(r.pub, sid_NM, tokenizer.n_codes)
        export.write_torch(r.pub, export.MODEL, tokenizer.payload())
    results = r.results(cfg, cfg.mode, catalog, n_items, quality, fit_info, where, enc.ids_N, sid_NM)
    log.info(
        "collision rate before dedup %.3f%%, max bucket %d, codes used per level %s, "
        "relative reconstruction error %.4f",
        100 * quality["collision_rate"],
        quality["max_bucket"],
        [lv["codes_used"] for lv in quality["levels"]],
        quality["relative_reconstruction_error"],
    )
    r.publish(results, {"mode": cfg.mode, "items": n_items})
    results["output_dir"] = cfg.output_dir
    results["log_path"] = r.log_path
    return results
