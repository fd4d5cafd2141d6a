"""kmeans mode: residual k-means fitted on the in-memory hash sample from the scan pass."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from semid_dist.config import Config
from semid_dist.math.kmeans import fit_residual_codebooks
from semid_dist.math.metrics import level_stats
from semid_dist.passes import ScanResult
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")


def fit(cfg: Config, scan: ScanResult) -> tuple[Tokenizer, dict]:
    """Fit the codebooks on scan's sample. The sample is consumed: the fit turns it into
    residuals in place and scan.sample_SD is emptied (nothing reads it after the fit, and the
    driver need not hold a second 200 MB copy through the fit and the encode pass)."""
    x_SD = torch.from_numpy(scan.sample_SD)
    how = "progressive-dimension" if cfg.kmeans_progressive else "plain"
    if cfg.kmeans_full_dim_levels and cfg.kmeans_progressive:
        how += f", full dimension at the first {min(cfg.kmeans_full_dim_levels, cfg.n_layers)} level(s)"
    log.info("kmeans: fitting %d levels x %d centroids on a sample of %d x %d (%s k-means, %d iters)",
             cfg.n_layers, cfg.n_clusters, x_SD.shape[0], x_SD.shape[1], how, cfg.max_iters)
    per_level = []

    def on_level(level: int, cb_KD: torch.Tensor, idx_S: torch.Tensor) -> None:
        st = level_stats(idx_S.numpy()[:, None], cfg.n_clusters)[0]
        st["level"] = level
        st["seconds"] = round(time.time() - t0, 3)
        per_level.append(st)
        log.info("kmeans: level %d fitted: %d/%d codes used on the sample, perplexity %.1f",
                 level, st["codes_used"], cfg.n_clusters, st["perplexity"])

    t0 = time.time()
    n_sample = int(x_SD.shape[0])
    scan.sample_SD = np.zeros((0, x_SD.shape[1]), np.float32)
    codebooks = fit_residual_codebooks(x_SD, cfg.n_layers, cfg.n_clusters, cfg.max_iters,
                                       seed=cfg.seed, progressive=cfg.kmeans_progressive,
                                       on_level=on_level, in_place=True,
                                       full_dim_levels=cfg.kmeans_full_dim_levels)
    del x_SD
    tok = Tokenizer("kmeans", cfg.to_dict(), codebooks_LKD=torch.stack(codebooks))
    return tok, {"sample_size": n_sample, "levels_on_sample": per_level,
                 "sample_ids_checksum": int(np.bitwise_xor.reduce(scan.sample_ids_S)) if scan.sample_ids_S.size else 0}
