"""k-means for residual quantization: k-means++ seeding, Lloyd with empty-cluster repair,
and progressive-dimension training.

Why progressive dimensions: on real sentence embeddings (MovieLens, 9,066 items, 3 x 256),
plain Lloyd per level leaves deep levels with a "hub" centroid near the origin that swallows
most residuals (last-level perplexity 19-80 of 256) and 2-3.7% of items collide. Residuals
at deep levels are close to isotropic, so Lloyd in the full 768-d space has many equally bad
local optima. Training first in the top principal directions and adding dimensions (warm
starting each stage from the last, as faiss' ResidualQuantizer does by default) cuts each
level along the directions of largest residual variance: perplexity rises to ~235-245 on
every level and collisions fall to ~0.7% (measurements in the README).
"""
from __future__ import annotations

import math

import torch

from semid_dist.math.nearest import nearest_code


def kmeans_plus_plus(x_ND: torch.Tensor, k: int, generator: torch.Generator,
                     trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007): each step draws `trials`
    candidates with probability ~ D(x)^2 and keeps the one that lowers the potential most.
    Plain k-means++ (one candidate) sometimes drops two seeds into one blob; the greedy
    variant (2 + log k candidates, the usual choice) rarely does."""
    n = x_ND.shape[0]
    assert k <= n, (k, n)
    trials = trials or 2 + int(math.log(k))
    centers_KD = torch.empty(k, x_ND.shape[1], dtype=x_ND.dtype)
    first = int(torch.randint(n, (1,), generator=generator))
    centers_KD[0] = x_ND[first]
    d2_N = ((x_ND - centers_KD[0]) ** 2).sum(1)
    for j in range(1, k):
        total = float(d2_N.sum())
        if total <= 0:  # fewer distinct points than k: any row will do
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            cand = torch.multinomial(d2_N / total, trials, replacement=True, generator=generator)
        # new potential for each candidate: sum_x min(d2(x), ||x - cand||^2)
        cand_d2_TN = torch.cdist(x_ND[cand], x_ND).pow_(2)
        pot_T = torch.minimum(cand_d2_TN, d2_N.unsqueeze(0)).sum(1)
        best = int(torch.argmin(pot_T))
        centers_KD[j] = x_ND[cand[best]]
        d2_N = torch.minimum(d2_N, cand_d2_TN[best])
    return centers_KD


def lloyd(x_ND: torch.Tensor, centers_KD: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations. An empty cluster is re-seeded at the point currently worst served,
    so all k codes stay in use (empty codes would be wasted ID space)."""
    k = centers_KD.shape[0]
    centers_KD = centers_KD.clone()
    for _ in range(iters):
        idx_N, d2_N = nearest_code(x_ND, centers_KD)
        count_K = torch.bincount(idx_N, minlength=k)
        sum_KD = torch.zeros_like(centers_KD).index_add_(0, idx_N, x_ND)
        filled = count_K > 0
        centers_KD[filled] = sum_KD[filled] / count_K[filled].unsqueeze(1).to(x_ND.dtype)
        n_empty = int((~filled).sum())
        if n_empty:
            worst = torch.topk(d2_N, n_empty).indices
            centers_KD[~filled] = x_ND[worst]
    return centers_KD


def _progressive_dims(d: int, start: int = 4) -> list[int]:
    dims, cur = [], start
    while cur < d:
        dims.append(cur)
        cur *= 2
    return dims + [d]


def fit_kmeans(
    x_ND: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    progressive: bool = True,
    stage_iters: int = 10,
) -> torch.Tensor:
    """Fit k centroids to x_ND (float32). Deterministic for a given generator state."""
    n, d = x_ND.shape
    if k > n:
        raise ValueError(f"k={k} centroids need at least {k} points, got {n}")
    if not progressive:
        return lloyd(x_ND, kmeans_plus_plus(x_ND, k, generator), iters)
    mean_D = x_ND.mean(0)
    xc_ND = x_ND - mean_D
    # Principal directions from the covariance (D x D eigh is cheap next to the N x D data).
    cov_DD = (xc_ND.T.double() @ xc_ND.double()) / max(n - 1, 1)
    _, vecs = torch.linalg.eigh(cov_DD)
    rot_DD = vecs.flip(1).to(x_ND.dtype)  # columns by decreasing variance
    xr_ND = xc_ND @ rot_DD
    dims = _progressive_dims(d)
    centers_KD = kmeans_plus_plus(xr_ND[:, : dims[0]].contiguous(), k, generator)
    for i, dim in enumerate(dims):
        if i:  # warm start: previous centers, zero in the newly added coordinates
            pad = torch.zeros(k, dim - centers_KD.shape[1], dtype=x_ND.dtype)
            centers_KD = torch.cat([centers_KD, pad], 1)
        last = i == len(dims) - 1
        centers_KD = lloyd(xr_ND[:, :dim].contiguous(), centers_KD, iters if last else stage_iters)
    return centers_KD @ rot_DD.T + mean_D


def fit_residual_codebooks(
    x_ND: torch.Tensor,
    n_levels: int,
    k: int,
    iters: int,
    seed: int,
    progressive: bool = True,
    on_level=None,
) -> list[torch.Tensor]:
    """RQ-KMeans: fit level l on the residuals of levels < l, all on the same sample."""
    generator = torch.Generator().manual_seed(seed)
    resid_ND = x_ND.clone()
    codebooks = []
    for level in range(n_levels):
        cb_KD = fit_kmeans(resid_ND, k, iters, generator, progressive=progressive)
        idx_N, _ = nearest_code(resid_ND, cb_KD)
        resid_ND -= cb_KD[idx_N]
        codebooks.append(cb_KD)
        if on_level is not None:
            on_level(level, cb_KD, idx_N)
    return codebooks


def kmeans_objective(x_ND: torch.Tensor, centers_KD: torch.Tensor) -> float:
    """Sum of squared distances to the nearest center."""
    return float(nearest_code(x_ND, centers_KD)[1].double().sum())
