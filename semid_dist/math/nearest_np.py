"""Nearest-centroid search and greedy residual encoding in numpy (no torch import).

Why numpy here: the encode pass runs in Ray workers, and a worker that imports torch holds
several hundred MB more memory. And for the shape that matters here (thousands of rows x 768
x 256 centroids), numpy's OpenBLAS sgemm ran faster than torch's MKL on the CPUs benchmarked.
nearest.backend_for picks this kernel (NumpyNearest) on the CPU everywhere, so the Python API
and the catalog pass give the same codes.

Every row is computed on its own (one GEMM row, one argmin), so the result of a row does not
depend on which other rows share its chunk: results are independent of batching and sharding.
One exception had to be closed: OpenBLAS computes small products (M x N x K up to ~1e6) with a
separate "small matrix" kernel whose rounding differs from the blocked sgemm (numpy on one row
uses gemv, different again), which could flip a near-tie depending on how many rows happened
to share a chunk (the tail of a shard, or Tokenizer.encode on one item). Short chunks are
therefore zero-padded to MIN_ROWS rows (and M x N x K above 2e6), so every row goes through
the same blocked kernel and comes out bit-identical to the same row inside a full CHUNK-row
product (tests/test_nearest_np.py).
"""

from __future__ import annotations

import numpy as np

from semid_dist.math.nearest import Nearest, Quantizer, as_numpy

# Rows per GEMM: large enough for an efficient sgemm, small enough that the chunk x K distance
# block (4 MB at K = 256) stays in cache.
CHUNK = 4096
MIN_ROWS = 64
SMALL_PRODUCT = 2_000_000  # rows x codes x dim below this would take another BLAS kernel


def _gemm_rows(x_BD: np.ndarray, cb_KD: np.ndarray) -> np.ndarray:
    """x_BD @ cb_KD.T, every row through the same blocked sgemm kernel (see the docstring)."""
    b, (k, d) = x_BD.shape[0], cb_KD.shape
    need = min(CHUNK, max(MIN_ROWS, -(-SMALL_PRODUCT // max(k * d, 1)) + 1))
    if b >= need:
        return x_BD @ cb_KD.T
    padded = np.zeros((need, x_BD.shape[1]), x_BD.dtype)
    padded[:b] = x_BD
    return (padded @ cb_KD.T)[:b]


def _nearest_chunk(
    x_BD: np.ndarray, cb_KD: np.ndarray, c_norm_K: np.ndarray, with_dist: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row for the argmin.
    d_BK = _gemm_rows(x_BD, cb_KD)
    d_BK *= -2.0
    d_BK += c_norm_K
    idx_B = d_BK.argmin(axis=1)  # ties: the lowest index
    if not with_dist:
        return idx_B, None
    best_B = np.take_along_axis(d_BK, idx_B[:, None], axis=1)[:, 0]
    x_norm_B = np.einsum("bd,bd->b", x_BD, x_BD)
    return idx_B, np.maximum(best_B + x_norm_B, 0.0)


def nearest_code_np(
    x_ND: np.ndarray, codebook_KD: np.ndarray, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Index (int64) of the nearest codeword for every row, and that squared distance."""
    assert x_ND.ndim == 2 and codebook_KD.ndim == 2 and x_ND.shape[1] == codebook_KD.shape[1]
    n = x_ND.shape[0]
    idx_N = np.empty(n, np.int64)
    dist_N = np.empty(n, x_ND.dtype)
    c_norm_K = np.einsum("kd,kd->k", codebook_KD, codebook_KD)
    for s in range(0, n, chunk):
        idx_N[s : s + chunk], dist_N[s : s + chunk] = _nearest_chunk(
            x_ND[s : s + chunk], codebook_KD, c_norm_K
        )
    return idx_N, dist_N


def residual_encode_np(
    x_ND: np.ndarray, codebooks_LKD, chunk: int = CHUNK, out_resid: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy residual quantization: codes (N, L) int64, and the final residual (N, D) if
    out_resid else its squared norm per row (N,) (float32 per row; sum it in float64)."""
    n = x_ND.shape[0]
    n_levels = len(codebooks_LKD)
    c_norms = [np.einsum("kd,kd->k", cb, cb) for cb in codebooks_LKD]
    codes_NL = np.empty((n, n_levels), np.int64)
    resid = np.empty_like(x_ND) if out_resid else np.empty(n, np.float32)
    for s in range(0, n, chunk):
        r_BD = x_ND[s : s + chunk]
        for level, cb_KD in enumerate(codebooks_LKD):
            idx_B, _ = _nearest_chunk(r_BD, cb_KD, c_norms[level], with_dist=False)
            codes_NL[s : s + chunk, level] = idx_B
            # the first subtraction makes the chunk's own copy; later ones work in place
            r_BD = r_BD - cb_KD[idx_B] if level == 0 else np.subtract(r_BD, cb_KD[idx_B], out=r_BD)
        if out_resid:
            resid[s : s + chunk] = r_BD
        else:  # per row in float32 (a few hundred terms), summed in float64 by the caller
            resid[s : s + chunk] = np.einsum("bd,bd->b", r_BD, r_BD)
    return codes_NL, resid


class NumpyNearest(Nearest):
    """The CPU's backend: the kernels above, and beam.py's beam search."""

    name = "numpy"

    def assign(self, x_ND, codes_KD) -> tuple[np.ndarray, np.ndarray]:
        return nearest_code_np(as_numpy(x_ND), as_numpy(codes_KD))

    def quantizer(self, codebooks_LKD, beam: int = 1) -> NumpyQuantizer:
        return NumpyQuantizer(codebooks_LKD, beam)


class NumpyQuantizer(Quantizer):
    def __init__(self, codebooks_LKD, beam: int = 1) -> None:
        books = (
            as_numpy(codebooks_LKD)
            if hasattr(codebooks_LKD, "ndim")
            else [as_numpy(c) for c in codebooks_LKD]
        )
        self.books = np.ascontiguousarray(books, np.float32)
        self.c_norms = [np.einsum("kd,kd->k", cb, cb) for cb in self.books]
        self.beam = beam

    def nearest(self, r_BD, level: int) -> np.ndarray:
        """One GEMM over the block (at most CHUNK rows, as the encode pass's chunks)."""
        return _nearest_chunk(as_numpy(r_BD), self.books[level], self.c_norms[level], with_dist=False)[0]

    def encode(self, x_ND) -> tuple[np.ndarray, np.ndarray]:
        """Codes and each row's squared error in float32 (sum it in float64): the encode pass's."""
        from semid_dist.math.beam import beam_encode_np

        return beam_encode_np(as_numpy(x_ND), self.books, self.beam)
