"""Tokenizer modes: how each one fits its Tokenizer type. The commands call ``fit``; nothing else in
the pipeline depends on the mode (the encode pass, dedup and export take any Tokenizer).

A mode is a module with ``fit(job: FitJob) -> (Tokenizer, info dict)`` and ``TOKENIZER``, its
Tokenizer type (the one loader, tokenizer.tokenizer_type, picks it by the mode a payload
names), named in MODES and in config.MODES; one that fits on a sample of the catalog also has
``sample_target(cfg, dim, n_items)``, the rows the scan pass keeps for it (and optionally
``wants_maxabs`` and ``announce_sample``). docs/architecture.md says what else a new mode needs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from semid_dist import config
from semid_dist.catalog.scan import ScanResult
from semid_dist.catalog.schema import Catalog
from semid_dist.config import Config
from semid_dist.io.publish import Publisher

MODES = {"kmeans": "semid_dist.modes.kmeans", "tiger": "semid_dist.modes.tiger"}
assert set(MODES) == set(config.MODES), (MODES, config.MODES)


@dataclass
class FitJob:
    """What a fit gets: the config, the catalog (the first n_items rows), the scan pass's
    result (every ItemID; the hash sample when the mode asked for one), and the run's
    Publisher for files the mode writes besides the tokenizer (tiger's checkpoints, plots)."""

    cfg: Config
    catalog: Catalog
    n_items: int
    scan: ScanResult
    pub: Publisher


def fit(job: FitJob):
    """(Tokenizer, info) from the mode job.cfg.mode names."""
    return importlib.import_module(MODES[job.cfg.mode]).fit(job)


def sample_target(cfg: Config, dim: int, n_items: int | None = None) -> int:
    """Rows of the hash sample the scan pass keeps for the fit (0: the mode needs none)."""
    module = importlib.import_module(MODES[cfg.mode])
    return module.sample_target(cfg, dim, n_items) if hasattr(module, "sample_target") else 0


def wants_maxabs(cfg: Config, dim: int, n_items: int) -> bool:
    """Whether the scan pass must also find the catalog's largest |value| for the fit."""
    module = importlib.import_module(MODES[cfg.mode])
    return module.wants_maxabs(cfg, dim, n_items) if hasattr(module, "wants_maxabs") else False


def announce_sample(cfg: Config, dim: int, n_items: int, rows: int) -> None:
    """Say in the log what the scan pass keeps for the fit, where the mode has something to say."""
    module = importlib.import_module(MODES[cfg.mode])
    if hasattr(module, "announce_sample"):
        module.announce_sample(cfg, dim, n_items, rows)
