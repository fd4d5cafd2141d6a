"""``semid train``: inputs -> scan pass -> fit -> encode pass -> collision policy -> export ->
publish. The steps live in ``pipeline/``, shared with ``semid encode`` and ``semid nightly``."""

from __future__ import annotations

from semid_dist.config import Config
from semid_dist.pipeline.fit import check_enough_items, fit_stage, scan_stage
from semid_dist.pipeline.ids import export_ids
from semid_dist.run import Run


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
        return export_ids(r, catalog, n_items, where, tokenizer, fit_info, scanned=True)
