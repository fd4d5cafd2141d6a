"""kmeans mode: residual k-means fitted on the hash sample from the scan pass, on the driver's
CPU or, with GPUs in the Ray cluster, in a task on one of them (docs/kmeans.md); and its
tokenizer, KmeansTokenizer: the codebooks, encoding with the nearest-code backend of their
device (math/nearest.py)."""

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
from semid_dist.math.nearest import Quantizer, backend_for
from semid_dist.math.nearest_torch import residual_decode
from semid_dist.math.rq_stats import RQStats, Scales, accumulate, lloyd_update, sq_error
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")


def sample_target(cfg: Config, dim: int, n_items: int | None = None) -> int:
    """Rows the scan pass keeps for the fit (a hash sample of about this many). The sample fit:
    --sample_per_centroid x --n_clusters, cut to what --kmeans_sample_gb holds (large codebooks
    would otherwise hold GBs in the driver), and never below math.sampling.sample_floor. The
    streamed fit's warm start needs fewer: at most STREAM_SAMPLE_PER_CENTROID per code."""
    rows = _sample_rows(cfg, dim)
    if n_items is not None and fit_kind(cfg, dim, n_items) == "stream":
        rows = min(
            rows, max(STREAM_SAMPLE_PER_CENTROID * cfg.n_clusters, sampling.sample_floor(cfg.n_clusters))
        )
    return rows


def _sample_rows(cfg: Config, dim: int) -> int:
    cap = int(cfg.kmeans_sample_gb * 1e9 // (4 * dim))
    floor = sampling.sample_floor(cfg.n_clusters)
    if cap < floor:
        raise UserError(
            f"--kmeans_sample_gb {cfg.kmeans_sample_gb:g} holds {cap} rows of {dim} floats; "
            f"--n_clusters {cfg.n_clusters} needs a sample of at least {floor}"
        )
    return max(min(cfg.sample_per_centroid * cfg.n_clusters, cap), floor)


STREAM_TOL = 1e-3  # stream passes stop once a pass lowers the squared error by less than this
# The streamed fit's warm start: the passes refine the upper levels on every item, so a smaller
# sample does, and the driver holds less while the scan fills it.
STREAM_SAMPLE_PER_CENTROID = 128
BEAM_TOL = 1e-4  # beam-aware Lloyd iterations on the sample: the same rule, finer (they are cheap)


def fit_kind(cfg: Config, dim: int, n_items: int) -> str:
    """sample or stream: --kmeans_fit, or for auto, stream exactly when --kmeans_sample_gb cuts
    the sample (today's 3 x 256 defaults keep the sample fit and its IDs)."""
    if cfg.kmeans_fit != "auto":
        return cfg.kmeans_fit
    return (
        "stream"
        if sample_target(cfg, dim) < min(cfg.sample_per_centroid * cfg.n_clusters, n_items)
        else "sample"
    )


def announce_sample(cfg: Config, dim: int, n_items: int, rows: int) -> None:
    """The scan's sample in the log: a streamed fit's warm start, or a sample fit's cut sample."""
    if fit_kind(cfg, dim, n_items) == "stream":
        log.info(
            "kmeans: streamed fit: a warm start on a sample of about %d rows (%.0f per centroid), then "
            "Lloyd passes over every item",
            rows,
            rows / cfg.n_clusters,
        )
    elif rows < min(cfg.sample_per_centroid * cfg.n_clusters, n_items):
        log.warning(
            "kmeans: sample cut to %d rows (%.0f per centroid instead of %d) to stay within "
            "--kmeans_sample_gb %g; raise it for a larger sample, or refine on every item with "
            "--kmeans_fit stream",
            rows,
            rows / cfg.n_clusters,
            cfg.sample_per_centroid,
            cfg.kmeans_sample_gb,
        )


def wants_maxabs(cfg: Config, dim: int, n_items: int) -> bool:
    """The streamed fit needs the catalog's largest |value| from the scan (math/rq_stats.py)."""
    return fit_kind(cfg, dim, n_items) == "stream"


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
    kind = fit_kind(cfg, job.catalog.dim, job.n_items)
    beam_sample = x_SD.copy() if cfg.beam_size > 1 and kind == "sample" else None  # the fit consumes x_SD
    if device == "cuda":
        books_LKD, per_level = fit_in_task(x_SD, cfg, "cuda", num_gpus=1)
    else:
        books_LKD, per_level = fit_levels(x_SD, cfg, None, live_log=True)
    del x_SD
    info = {
        "fit": kind,
        "sample_size": n_sample,
        "levels_on_sample": per_level,
        "device": device,
        "sample_ids_checksum": int(np.bitwise_xor.reduce(scan.sample_ids_S)) if scan.sample_ids_S.size else 0,
    }
    if kind == "stream":
        books, info["stream"] = stream_refine(job, books_LKD.numpy(), scan.maxabs, device)
        books_LKD = torch.from_numpy(books)
    elif beam_sample is not None:
        books, info["beam_refine"] = beam_refine(beam_sample, books_LKD.numpy(), cfg)
        books_LKD = torch.from_numpy(books)
    return KmeansTokenizer(cfg.to_dict(), books_LKD), info


def beam_refine(x_SD: np.ndarray, books_LKD: np.ndarray, cfg: Config) -> tuple[np.ndarray, dict]:
    """Lloyd iterations on the sample whose assignment is the beam search the tokenizer will
    encode with (--beam_size > 1): codebooks fitted for greedy encoding leave most of what beam
    search could gain on the table. At most --max_iters iterations; stops after one that lowered
    the squared error by less than BEAM_TOL (relative)."""
    books = np.ascontiguousarray(books_LKD, np.float32)
    maxabs = float(np.abs(x_SD).max())
    iters, prev = [], None
    for it in range(cfg.max_iters):
        scales = Scales.for_catalog(maxabs, books, len(x_SD))
        stats = RQStats.zeros(*books.shape)
        accumulate(x_SD, books, scales, stats, backend_for("cpu").quantizer(books, cfg.beam_size))
        err = sq_error(stats, scales)
        books = lloyd_update(books, stats, scales)
        iters.append({"iteration": it + 1, "sq_err_before": err})
        if prev is not None and prev - err < BEAM_TOL * prev:
            break
        prev = err
    log.info(
        "kmeans: %d Lloyd iteration(s) on the sample with beam %d assignments", len(iters), cfg.beam_size
    )
    return books, {"iterations": iters, "beam_size": cfg.beam_size, "tolerance": BEAM_TOL}


def stream_refine(job, books_LKD: np.ndarray, maxabs: float, device: str) -> tuple[np.ndarray, dict]:
    """Full-catalog Lloyd passes from the sample fit's codebooks: each pass encodes every item
    as the encode pass will (greedy, or beam search with --beam_size) in tasks spread over the
    cluster, sums every level's residuals per code exactly (math/rq_stats.py), and moves every
    code of every level but the last to the mean of its rows. The last level keeps the sample
    fit's codebook: Lloyd at full dimension there gathers rows around fewer codes, and the last
    level decides which items share a whole ID (docs/kmeans.md; BENCHMARKS.md). At most
    --kmeans_stream_passes passes; after a pass that lowered the
    squared error by less than STREAM_TOL (relative) against the pass before, its update is
    the last. The stopping rule reads exact integer sums, so it too is independent of how the
    catalog is sharded."""
    from semid_dist.catalog.stats import stats_pass

    cfg, books = job.cfg, np.ascontiguousarray(books_LKD, np.float32)
    passes, prev = [], None
    for p in range(cfg.kmeans_stream_passes):
        t0 = time.time()
        scales = Scales.for_catalog(maxabs, books, job.n_items)
        what = f"kmeans stream pass {p + 1}"
        stats = stats_pass(job.catalog, job.n_items, books, scales, what, device, cfg.beam_size)
        err = sq_error(stats, scales)
        moved = lloyd_update(books, stats, scales)
        books[: max(1, len(books) - 1)] = moved[: max(1, len(books) - 1)]  # the last level stays
        passes.append({"pass": p + 1, "sq_err_before": err, "seconds": round(time.time() - t0, 3)})
        log.info(
            "kmeans: stream pass %d/%d: squared error %.6g before its update%s, %.1f s",
            p + 1,
            cfg.kmeans_stream_passes,
            err,
            f" ({100 * (prev - err) / prev:.3f}% below the pass before)" if prev else "",
            time.time() - t0,
        )
        if prev is not None and prev - err < STREAM_TOL * prev:
            break
        prev = err
    return books, {"passes": passes, "max_passes": cfg.kmeans_stream_passes, "tolerance": STREAM_TOL}


def fit_levels(
    x_SD: np.ndarray, cfg: Config, device: str | None, live_log: bool = False
) -> tuple[torch.Tensor, list[dict]]:
    """The codebooks (L, K, D) fitted on x_SD (overwritten when writable) and per-level stats
    on the sample; device: where the assignments run (None: the CPU; math/nearest.py)."""
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
        backend=backend_for(device),
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


class KmeansTokenizer(Tokenizer):
    """Residual k-means codebooks (L, K, D). Encodes greedily, or by beam search with the
    --beam_size it was trained with, using the backend of the codebooks' device: on the CPU the
    encode pass's numpy kernel, so that the Python API reproduces the published codes."""

    mode = "kmeans"

    def __init__(self, config: dict, codebooks_LKD: torch.Tensor):
        super().__init__(config)
        assert codebooks_LKD is not None and codebooks_LKD.ndim == 3
        self.codebooks_LKD = codebooks_LKD
        self._quantizer: Quantizer | None = None  # the device's backend over the codebooks, on first use

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_quantizer": None}  # rebuilt where the tokenizer lands

    @property
    def n_layers(self) -> int:
        return int(self.codebooks_LKD.shape[0])

    @property
    def n_codes(self) -> int:
        return int(self.codebooks_LKD.shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.codebooks_LKD.shape[2])

    @property
    def beam_size(self) -> int:
        """Code paths kept per level when encoding (1: greedy), as trained."""
        return int(self.config.get("beam_size", 1)) if isinstance(self.config, dict) else 1

    @property
    def device(self) -> torch.device:
        return self.codebooks_LKD.device

    def to(self, device: str | torch.device) -> KmeansTokenizer:
        self._quantizer = None
        self.codebooks_LKD = self.codebooks_LKD.to(device)
        return self

    @torch.no_grad()
    def encode_with_error(self, x) -> tuple[np.ndarray, np.ndarray]:
        x_ND = self._as_tensor(x)
        if self._quantizer is None:
            self._quantizer = backend_for(self.device).quantizer(self.codebooks_LKD, self.beam_size)
        return self._quantizer.encode(x_ND)

    def last_level_candidates(self, x, codes_NL: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact error of each candidate, ranked by it."""
        from semid_dist.math.relocate import last_level_candidates_np

        x_ND = self._as_tensor(x)
        books = self.codebooks_LKD.detach().cpu().float().numpy()
        return last_level_candidates_np(x_ND.cpu().numpy(), books, np.asarray(codes_NL), k)

    @torch.no_grad()
    def decode(self, codes_NL) -> np.ndarray:
        """The sum of the codes' centroids."""
        c = torch.as_tensor(np.asarray(codes_NL), dtype=torch.long)
        return residual_decode(c.to(self.device), list(self.codebooks_LKD)).cpu().numpy()

    def cpu_encoder(self):
        """The numpy codebooks and the beam size (catalog.encode.NumpyRQ): a task that only
        reads and encodes never imports torch."""
        from semid_dist.catalog.encode import NumpyRQ

        return NumpyRQ(self.codebooks_LKD.detach().cpu().float().contiguous().numpy(), self.beam_size)

    def tensors(self) -> dict:
        return {"codebooks": self.codebooks_LKD.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, config: dict, payload: dict) -> KmeansTokenizer:
        return cls(config, payload["codebooks"].float())

    def config_sizes(self) -> dict[str, int]:
        return {"n_clusters": self.n_codes}

    def fingerprint_parts(self) -> tuple[bytes, dict[str, torch.Tensor]]:
        return b"", self.tensors()


TOKENIZER = KmeansTokenizer
