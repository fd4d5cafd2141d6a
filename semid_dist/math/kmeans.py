"""k-means for residual quantization: k-means++ seeding, Lloyd with empty-cluster repair,
and progressive-dimension training.

Why progressive dimensions: on real sentence embeddings, plain Lloyd per level leaves deep
levels with a "hub" centroid near the origin that swallows most residuals, so codes are used
very unevenly and many items collide. Residuals at deep levels are close to isotropic, so
Lloyd in the full space has many equally bad local optima. Training first in the top principal
directions and adding dimensions (warm starting each stage from the last, as faiss'
ResidualQuantizer does by default) cuts each level along the directions of largest residual
variance: codes are used nearly evenly on every level and far fewer items collide (see
BENCHMARKS.md).

Speed (the fit is on the critical path of every kmeans run): the heavy loops run in numpy
on the tensors' memory (numpy's sgemm, for the reasons in math/nearest_np.py); the
reduced-dimension stages (32, 64, 128, 256 principal directions) only find a warm start, so
they and the PCA use a strided subsample of 64 points per centroid; the last stage runs in the
full dimension on every point, in the original coordinates (distances do not change under
rotation, so the data is rotated only into the 256 directions the reduced stages need); every
stage stops once an iteration lowers the objective by less than CONVERGED (relative), and
--max_iters caps the last stage. The subsample costs little in quality: the reduced stages
only seed the last one, which sees every point.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from semid_dist.math.nearest import Nearest, backend_for

PROGRESSIVE_START = 32  # first stage's dimension (below it, stages cost more than they help)
MAX_REDUCED = 256  # last reduced-dimension stage; the next stage is the full dimension
STAGE_ITERS = 5  # Lloyd iterations per reduced stage (at most)
REDUCED_PER_CENTROID = 64  # reduced stages (and the PCA) use this many points per centroid
SEED_PER_CENTROID = 128  # greedy k-means++ at full dimension seeds from this many points per centroid
CONVERGED = 1e-3  # stop a stage when an iteration lowers the objective by less than this


@contextlib.contextmanager
def _torch_single_thread():
    """Torch runs single-threaded inside: the GEMMs (numpy) already use every core and torch
    does only small ops here (index_add_, sampling); with its own thread pool as well, the two
    pools would contend for the same cores and slow the fit down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def kmeans_plus_plus(
    x_ND: torch.Tensor, k: int, generator: torch.Generator, trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): each step draws `trials`
    candidates with probability ~ D(x)^2 and keeps the one that lowers the potential most.
    Plain k-means++ (one candidate) sometimes drops two seeds into one blob; the greedy
    variant (2 + log k candidates, the usual choice) rarely does."""
    n = x_ND.shape[0]
    assert k <= n, (k, n)
    trials = trials or 2 + int(math.log(k))
    x = np.ascontiguousarray(x_ND.detach().cpu().numpy(), dtype=np.float32)
    x_sq_N = np.einsum("nd,nd->n", x, x)
    centers_KD = torch.empty(k, x_ND.shape[1], dtype=x_ND.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centers_KD[0] = x_ND[first]
    d2_N = np.maximum(x_sq_N - 2 * (x @ x[first]) + x_sq_N[first], 0)
    cand_d2_TN = np.empty((trials, n), np.float32)
    pot_TN = np.empty((trials, n), np.float32)
    for j in range(1, k):
        total = float(d2_N.sum(dtype=np.float64))
        if total <= 0:  # fewer distinct points than k: any row will do
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            cand = torch.multinomial(
                torch.from_numpy(d2_N / total), trials, replacement=True, generator=generator
            )
        # new potential for each candidate: sum_x min(d2(x), ||x - cand||^2). The distances as
        # one small GEMM, in place (torch.cdist computes them pairwise, which is much slower).
        c = cand.numpy()
        np.matmul(x[c], x.T, out=cand_d2_TN)
        cand_d2_TN *= -2
        cand_d2_TN += x_sq_N
        cand_d2_TN += x_sq_N[c, None]
        np.maximum(cand_d2_TN, 0, out=cand_d2_TN)
        pot_T = np.minimum(cand_d2_TN, d2_N, out=pot_TN).sum(1, dtype=np.float64)
        best = int(np.argmin(pot_T))
        centers_KD[j] = x_ND[cand[best]]
        np.minimum(d2_N, cand_d2_TN[best], out=d2_N)
    return centers_KD


def lloyd(
    x_ND: torch.Tensor, centers_KD: torch.Tensor, iters: int, tol: float = 0.0, backend: Nearest | None = None
) -> torch.Tensor:
    """Lloyd iterations. An empty cluster is re-seeded at the point currently worst served,
    so all k codes stay in use (empty codes would be wasted ID space). With tol > 0, stop once
    an iteration lowers the objective by less than tol (relative). backend: where the
    assignments run (math/nearest.py; None: numpy on the CPU)."""
    x = np.ascontiguousarray(x_ND.detach().cpu().numpy(), dtype=np.float32)
    c = np.array(centers_KD.detach().cpu().numpy(), dtype=np.float32, copy=True)
    with _torch_single_thread():
        return torch.from_numpy(_lloyd_np(x, c, iters, tol, backend)[0])


def _lloyd_np(
    x_ND: np.ndarray, c_KD: np.ndarray, iters: int, tol: float = 0.0, backend: Nearest | None = None
) -> tuple[np.ndarray, int]:
    """lloyd() on float32 numpy arrays (c_KD is updated in place); returns (centers, iterations)."""
    k = c_KD.shape[0]
    x_t = torch.from_numpy(x_ND)
    be = backend or backend_for(None)
    x_on = be.put(x_ND)  # once: an iteration then moves only the centroids and the indices
    prev = math.inf
    for it in range(iters):
        idx_N, d2_N = be.assign(x_on, c_KD)
        count_K = np.bincount(idx_N, minlength=k)
        sum_KD = torch.zeros(k, x_ND.shape[1]).index_add_(0, torch.from_numpy(idx_N), x_t).numpy()
        filled = count_K > 0
        c_KD[filled] = sum_KD[filled] / count_K[filled, None].astype(np.float32)
        n_empty = k - int(filled.sum())
        if n_empty:
            worst = np.argsort(-d2_N, kind="stable")[:n_empty]
            c_KD[~filled] = x_ND[worst]
        sse = float(d2_N.sum(dtype=np.float64))
        if tol > 0 and prev - sse <= tol * sse:
            return c_KD, it + 1
        prev = sse
    return c_KD, iters


def _progressive_dims(d: int, start: int = PROGRESSIVE_START, stop: int = MAX_REDUCED) -> list[int]:
    dims, cur = [], start
    while cur < d and cur <= stop:
        dims.append(cur)
        cur *= 2
    return dims + [d]


def fit_kmeans(
    x_ND: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    progressive: bool = True,
    stage_iters: int = STAGE_ITERS,
    seed_points: int | None = None,
    backend: Nearest | None = None,
) -> torch.Tensor:
    """Fit k centroids to x_ND (float32). Deterministic for a given generator state.

    Without progressive: greedy k-means++ on every point (or on a strided subsample of
    seed_points of them), then Lloyd on every point for `iters` iterations. backend: where the
    Lloyd assignments run (math/nearest.py; None: numpy on the CPU, where seeding and the PCA
    always run)."""
    n, d = x_ND.shape
    if k > n:
        raise ValueError(f"k={k} centroids need at least {k} points, got {n}")
    with _torch_single_thread():
        return _fit_kmeans(x_ND, k, iters, generator, progressive, stage_iters, seed_points, backend)


def _fit_kmeans(
    x_ND: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    progressive: bool,
    stage_iters: int,
    seed_points: int | None = None,
    backend: Nearest | None = None,
) -> torch.Tensor:
    n, d = x_ND.shape
    if not progressive:
        m = n if seed_points is None else max(k, min(n, seed_points))
        # strided: deterministic, and the rows arrive sorted by ItemID
        seed_from = x_ND if m == n else x_ND[:: n // m][:m]
        return lloyd(x_ND, kmeans_plus_plus(seed_from, k, generator), iters, backend=backend)
    x = np.ascontiguousarray(x_ND.detach().cpu().numpy(), dtype=np.float32)
    # The reduced stages only find a warm start: a strided subsample does (deterministic: the
    # rows arrive sorted by ItemID).
    m = min(n, REDUCED_PER_CENTROID * k)
    xs = x[:: n // m][:m] if m < n else x
    mean_D = xs.mean(0, dtype=np.float64)
    # Principal directions from the covariance (one m x D x D GEMM; D x D eigh is cheap).
    gram_DD = (xs.T @ xs).astype(np.float64)
    cov_DD = (gram_DD - m * np.outer(mean_D, mean_D)) / max(m - 1, 1)
    _, vecs = np.linalg.eigh(cov_DD)
    dims = _progressive_dims(d)
    top = dims[-2] if len(dims) > 1 else 0  # the largest reduced dimension a stage needs
    # Centred data in the top principal directions only: (x - mean) @ R[:, :top]
    rot_DT = np.ascontiguousarray(vecs[:, ::-1][:, :top]).astype(np.float32)
    xr_NT = xs @ rot_DT
    xr_NT -= (mean_D @ rot_DT).astype(np.float32)
    first = np.ascontiguousarray(xr_NT[:, : dims[0]]) if top else xs
    c_KT = kmeans_plus_plus(torch.from_numpy(first), k, generator).numpy()
    for i, dim in enumerate(dims[:-1]):
        if i:  # warm start: previous centers, zero in the newly added coordinates
            c_KT = np.concatenate([c_KT, np.zeros((k, dim - c_KT.shape[1]), np.float32)], 1)
        c_KT, _ = _lloyd_np(np.ascontiguousarray(xr_NT[:, :dim]), c_KT, stage_iters, CONVERGED, backend)
    del xr_NT, first
    # Full dimension on every point, in the original coordinates (the warm start rotated back,
    # zero in the directions the reduced stages left out).
    c_KD = (c_KT @ rot_DT.T + mean_D).astype(np.float32) if top else c_KT
    c_KD, _ = _lloyd_np(x, np.ascontiguousarray(c_KD), iters, CONVERGED, backend)
    return torch.from_numpy(c_KD)


def fit_residual_codebooks(
    x_ND: torch.Tensor,
    n_levels: int,
    k: int,
    iters: int,
    seed: int,
    progressive: bool = True,
    on_level=None,
    in_place: bool = False,
    full_dim_levels: int = 0,
    backend: Nearest | None = None,
) -> list[torch.Tensor]:
    """RQ-KMeans: fit level l on the residuals of levels < l, all on the same sample.

    With progressive, levels below full_dim_levels are fitted in the full dimension (greedy
    k-means++ from SEED_PER_CENTROID points per centroid, then `iters` Lloyd iterations on every
    point) and the others progressively; without it every level is plain k-means. Full dimension
    at the top levels trades collisions for reconstruction error: a lower error, but more
    collisions and a several times slower fit (see BENCHMARKS.md), so the default is 0.

    in_place=True lets a C-contiguous float32 CPU x_ND be overwritten by the residuals (the
    caller gives the sample up; saves a copy of it, 200 MB for 65,536 x 768). backend: where
    the Lloyd assignments and each level's assignment run (math/nearest.py; None: numpy on the
    CPU; on a GPU float32 sums in another order may flip near-ties, so the codebooks can differ
    slightly from a CPU fit)."""
    generator = torch.Generator().manual_seed(seed)
    x = x_ND.detach().cpu().numpy()
    resid_ND = (
        x
        if in_place and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable
        else np.array(x, dtype=np.float32, order="C", copy=True)
    )
    codebooks = []
    for level in range(n_levels):
        if progressive and level < full_dim_levels:
            cb_KD = fit_kmeans(
                torch.from_numpy(resid_ND),
                k,
                iters,
                generator,
                progressive=False,
                seed_points=SEED_PER_CENTROID * k,
                backend=backend,
            )
        else:
            cb_KD = fit_kmeans(
                torch.from_numpy(resid_ND), k, iters, generator, progressive=progressive, backend=backend
            )
        cb = cb_KD.numpy()
        be = backend or backend_for(None)
        idx_N, _ = be.assign(be.put(resid_ND), cb)
        for s in range(0, len(idx_N), 4096):  # in cache-sized chunks: no N x D temporary
            np.subtract(resid_ND[s : s + 4096], cb[idx_N[s : s + 4096]], out=resid_ND[s : s + 4096])
        codebooks.append(cb_KD)
        if on_level is not None:
            on_level(level, cb_KD, torch.from_numpy(idx_N))
    return codebooks


def kmeans_objective(x_ND: torch.Tensor, centers_KD: torch.Tensor) -> float:
    """Sum of squared distances to the nearest center (the backend of the tensors' device)."""
    return float(backend_for(x_ND.device).assign(x_ND, centers_KD)[1].sum(dtype=np.float64))
