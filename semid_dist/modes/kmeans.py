"""kmeans mode: residual k-means fitted on the hash sample from the scan pass, on the driver's
CPU or, with GPUs in the Ray cluster, in a task on one of them (docs/kmeans.md)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math import sampling
from semid_dist.math.kmeans import fit_residual_codebooks
from semid_dist.math.metrics import level_stats
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")


def sample_target(cfg: Config, dim: int) -> int:
    """Rows the scan pass keeps for the fit (a hash sample of about this many):
    --sample_per_centroid x --n_clusters, cut to what --kmeans_sample_gb holds (large codebooks
    would otherwise hold GBs in the driver), and never below math.sampling.sample_floor."""
    cap = int(cfg.kmeans_sample_gb * 1e9 // (4 * dim))
    floor = sampling.sample_floor(cfg.n_clusters)
    if cap < floor:
        raise UserError(
            f"--kmeans_sample_gb {cfg.kmeans_sample_gb:g} holds {cap} rows of {dim} floats; "
            f"--n_clusters {cfg.n_clusters} needs a sample of at least {floor}"
        )
    return max(min(cfg.sample_per_centroid * cfg.n_clusters, cap), floor)


def fit(job) -> tuple[Tokenizer, dict]:
    """Fit the codebooks on the scan's sample (job: modes.FitJob): on the driver's CPU, or with
    GPUs in the Ray cluster (--device auto|cuda, as for the encode pass) in a Ray task on one of
    them, where the Lloyd assignments run. The sample is consumed: the fit turns it into
    residuals in place and scan.sample_SD is emptied (nothing reads it after the fit, and the
    driver need not hold a second copy through the fit and the encode pass)."""
    from semid_dist.catalog.encode import encode_device

    cfg, scan = job.cfg, job.scan
    device, _ = encode_device(cfg.device)
    x_SD = scan.sample_SD
    how = "progressive-dimension" if cfg.kmeans_progressive else "plain"
    if cfg.kmeans_full_dim_levels and cfg.kmeans_progressive:
        how += f", full dimension at the first {min(cfg.kmeans_full_dim_levels, cfg.n_layers)} level(s)"
    log.info(
        "kmeans: fitting %d levels x %d centroids on a sample of %d x %d (%s k-means, %d iters) on %s",
        cfg.n_layers,
        cfg.n_clusters,
        x_SD.shape[0],
        x_SD.shape[1],
        how,
        cfg.max_iters,
        "a GPU" if device == "cuda" else "the CPU",
    )
    n_sample = int(x_SD.shape[0])
    if n_sample < cfg.n_clusters:  # the hash sample came out short (math.sampling.sample_floor)
        raise UserError(
            f"the k-means sample kept {n_sample} rows, fewer than --n_clusters {cfg.n_clusters}: "
            "raise --sample_per_centroid"
        )
    scan.sample_SD = np.zeros((0, x_SD.shape[1]), np.float32)
    if device == "cuda":
        books_LKD, per_level = fit_in_task(x_SD, cfg, "cuda", num_gpus=1)
    else:
        books_LKD, per_level = fit_levels(x_SD, cfg, None, live_log=True)
    del x_SD
    tok = Tokenizer("kmeans", cfg.to_dict(), codebooks_LKD=books_LKD)
    return tok, {
        "sample_size": n_sample,
        "levels_on_sample": per_level,
        "device": device,
        "sample_ids_checksum": int(np.bitwise_xor.reduce(scan.sample_ids_S)) if scan.sample_ids_S.size else 0,
    }


def fit_levels(
    x_SD: np.ndarray, cfg: Config, device: str | None, live_log: bool = False
) -> tuple[torch.Tensor, list[dict]]:
    """The codebooks (L, K, D) fitted on x_SD (overwritten when writable) and per-level stats
    on the sample; device as for fit_residual_codebooks."""
    per_level = []

    def on_level(level: int, cb_KD: torch.Tensor, idx_S: torch.Tensor) -> None:
        st = level_stats(idx_S.numpy()[:, None], cfg.n_clusters)[0]
        st["level"] = level
        st["seconds"] = round(time.time() - t0, 3)
        per_level.append(st)
        if live_log:
            _log_level(st, cfg)

    t0 = time.time()
    codebooks = fit_residual_codebooks(
        torch.from_numpy(x_SD),
        cfg.n_layers,
        cfg.n_clusters,
        cfg.max_iters,
        seed=cfg.seed,
        progressive=cfg.kmeans_progressive,
        on_level=on_level,
        in_place=True,
        full_dim_levels=cfg.kmeans_full_dim_levels,
        device=device,
    )
    return torch.stack(codebooks), per_level


def fit_in_task(x_SD: np.ndarray, cfg: Config, device: str, num_gpus: int) -> tuple[torch.Tensor, list[dict]]:
    """fit_levels as a Ray task holding num_gpus GPUs: under `ray job submit` the driver often
    runs on a head node without one. Its per-level lines are logged here when it returns."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=0)(fit_levels)
    books_LKD, per_level = ray.get(task.remote(x_SD, cfg, device))
    for st in per_level:
        _log_level(st, cfg)
    return books_LKD, per_level


def _log_level(st: dict, cfg: Config) -> None:
    log.info(
        "kmeans: level %d fitted: %d/%d codes used on the sample, perplexity %.1f",
        st["level"],
        st["codes_used"],
        cfg.n_clusters,
        st["perplexity"],
    )
