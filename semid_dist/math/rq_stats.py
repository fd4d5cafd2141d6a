"""Per-code statistics of residual quantization in exact fixed point, and the Lloyd update.

The streamed k-means fit (modes/kmeans.py, docs/kmeans.md) refines the codebooks over the whole
catalog: each read task encodes its rows greedily and adds, for every level, each row's
residual into the sum of the code it was assigned, plus the counts and the squared error; the
driver adds the tasks' statistics and moves every code to the mean of its rows.

Floating-point sums depend on the order of the additions, and the order depends on how the
catalog is cut into files, tasks and nodes. Here every value is rounded once, on its own, to a
multiple of 2^-s (``fixed_point_scale``), and summed as int64: integer addition is associative,
so the statistics, and the codebooks made from them, are bit-identical however the rows are
sharded or ordered. The scale is a power of two chosen so that no sum of `n_rows` values can
overflow int64; the rounding (2^-s, far below float32's resolution of the result) is the price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from semid_dist.math.nearest import Quantizer, backend_for
from semid_dist.math.nearest_np import CHUNK

INT_BUDGET = 2.0**62  # the most any int64 sum may reach
MAX_SCALE_EXP = 40


def fixed_point_scale(bound: float, n_rows: int) -> float:
    """The power of two s such that n_rows values of magnitude <= bound, each times s, sum to
    at most 2^62 (capped at 2^40)."""
    room = INT_BUDGET / (max(int(n_rows), 1) * max(float(bound), 1e-30))
    return 2.0 ** min(math.floor(math.log2(room)), MAX_SCALE_EXP)


def residual_bounds(maxabs_x: float, codebooks_LKD: np.ndarray) -> list[float]:
    """An upper bound on |residual| (elementwise) entering each level: the input's largest
    magnitude plus the largest codeword magnitude of every level above."""
    bounds = [float(maxabs_x)]
    for cb in codebooks_LKD[:-1]:
        bounds.append(bounds[-1] + float(np.abs(cb).max()))
    return bounds


@dataclass
class Scales:
    """The fixed-point scale of each level's residual sums, and of the squared errors."""

    level_L: list[float]
    err: float

    @classmethod
    def for_catalog(cls, maxabs_x: float, codebooks_LKD: np.ndarray, n_rows: int) -> Scales:
        bounds = residual_bounds(maxabs_x, codebooks_LKD)
        final = bounds[-1] + float(np.abs(codebooks_LKD[-1]).max())
        dim = codebooks_LKD.shape[2]
        return cls([fixed_point_scale(b, n_rows) for b in bounds], fixed_point_scale(dim * final**2, n_rows))


@dataclass
class RQStats:
    """Sums of residuals per code (L, K, D) and counts (L, K), both int64, and the summed
    squared final error, at the scales of a Scales."""

    sums_LKD: np.ndarray
    counts_LK: np.ndarray
    sq_err: int

    @classmethod
    def zeros(cls, n_levels: int, k: int, dim: int) -> RQStats:
        return cls(np.zeros((n_levels, k, dim), np.int64), np.zeros((n_levels, k), np.int64), 0)

    def add(self, other: RQStats) -> None:
        self.sums_LKD += other.sums_LKD
        self.counts_LK += other.counts_LK
        self.sq_err += other.sq_err


def _to_fixed(values: np.ndarray, scale: float) -> np.ndarray:
    """Each value rounded to the nearest multiple of 1/scale, as int64 multiples (exact: the
    scale is a power of two, so the product is exact in float64)."""
    return np.rint(values.astype(np.float64) * scale).astype(np.int64)


def _add_per_code(sums_KD: np.ndarray, counts_K: np.ndarray, idx_B: np.ndarray, q_BD: np.ndarray) -> None:
    order = np.argsort(idx_B, kind="stable")
    sorted_idx = idx_B[order]
    starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
    codes = sorted_idx[starts]
    sums_KD[codes] += np.add.reduceat(q_BD[order], starts, axis=0)
    counts_K[codes] += np.diff(np.r_[starts, len(idx_B)])


def accumulate(
    x_ND: np.ndarray,
    codebooks_LKD: np.ndarray,
    scales: Scales,
    stats: RQStats,
    quantizer: Quantizer | None = None,
    chunk: int = CHUNK,
) -> None:
    """Encode x with the codebooks as the encode pass does (greedy, or beam search when the
    quantizer keeps a beam) and add into stats, for every level, each row's residual entering
    that level to the sum of the code it took there, the counts, and the squared final errors.
    quantizer (math/nearest.py) finds the codes; without one, the CPU's greedy kernel."""
    q = quantizer or backend_for("cpu").quantizer(codebooks_LKD)
    for s in range(0, x_ND.shape[0], chunk):
        r_BD = np.array(x_ND[s : s + chunk], np.float32)
        codes_BL = q.encode(r_BD)[0] if q.beam > 1 else None
        for level, cb_KD in enumerate(codebooks_LKD):
            idx_B = codes_BL[:, level] if codes_BL is not None else q.nearest(r_BD, level)
            _add_per_code(
                stats.sums_LKD[level], stats.counts_LK[level], idx_B, _to_fixed(r_BD, scales.level_L[level])
            )
            np.subtract(r_BD, cb_KD[idx_B], out=r_BD)
        stats.sq_err += int(_to_fixed(np.einsum("bd,bd->b", r_BD, r_BD), scales.err).sum())


def lloyd_update(codebooks_LKD: np.ndarray, stats: RQStats, scales: Scales) -> np.ndarray:
    """Every code moved to the mean of the residuals assigned to it; a code no row chose keeps
    its place. Returns new float32 codebooks."""
    out = np.array(codebooks_LKD, np.float32, copy=True)
    for level in range(out.shape[0]):
        n_K = stats.counts_LK[level]
        used = n_K > 0
        mean = stats.sums_LKD[level][used].astype(np.float64) / (n_K[used, None] * scales.level_L[level])
        out[level][used] = mean.astype(np.float32)
    return out


def sq_error(stats: RQStats, scales: Scales) -> float:
    return stats.sq_err / scales.err
