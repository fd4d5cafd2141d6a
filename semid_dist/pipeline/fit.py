"""Before the encode pass: the scan pass and the fit (``semid train``, and ``semid nightly`` when
it trains), and the config as a given tokenizer runs it (``semid encode``, ``semid nightly``)."""

from __future__ import annotations

import io

from semid_dist import modes
from semid_dist.catalog.scan import ScanResult, scan_pass
from semid_dist.catalog.schema import Catalog
from semid_dist.config import CODES_FIELD, Config
from semid_dist.errors import UserError
from semid_dist.run import Run
from semid_dist.tokenizer import Tokenizer


def check_enough_items(cfg: Config, n_items: int, dim: int) -> None:
    """Before fitting: a codebook cannot have more codes than there are items to fit it on, and
    the mode's sample must fit its memory cap (modes.sample_target raises if not)."""
    if cfg.n_codes > n_items:
        flag = CODES_FIELD[cfg.mode]
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
        scan.check_unique(catalog)
    return scan


def fit_stage(r: Run, catalog: Catalog, n_items: int, scan: ScanResult) -> tuple[Tokenizer, dict]:
    with r.stage("fit"):
        return modes.fit(modes.FitJob(r.cfg, catalog, n_items, scan, r.pub))


def as_run(cfg: Config, tok: Tokenizer) -> Config:
    """The config as it really runs: the mode, levels and sizes of the tokenizer applied,
    whatever the flags said."""
    return cfg.replace(mode=tok.mode, n_layers=tok.n_layers, **tok.config_sizes())


def payload_bytes(tok: Tokenizer) -> bytes:
    """final_model.pt's bytes for a tokenizer fitted in this run."""
    import torch

    buf = io.BytesIO()
    torch.save(tok.payload(), buf)
    return buf.getvalue()
