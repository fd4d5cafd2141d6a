"""Beam-search residual encoding (numpy, no torch import).

Greedy residual encoding picks, level by level, the code nearest to what the levels above left;
an early choice that is second best can leave a residual the deeper levels quantize better.
Beam search keeps the `beam` best partial code paths at every level, scored by their exact
squared error so far, and at the end takes the path with the least final error (as faiss's
ResidualQuantizer does with max_beam_size). Beam 1 is greedy encoding and runs the greedy
kernel (math/nearest_np.py), so its codes are bit-identical to it.

Every row is searched on its own (its paths' GEMM rows go through the same blocked kernel as in
nearest_np), so a row's codes do not depend on the other rows of its chunk. Ties between equal
path errors go to the path listed first (lower previous rank, then lower code).
"""

from __future__ import annotations

import numpy as np

from semid_dist.math.nearest_np import CHUNK, _gemm_rows, residual_encode_np


def beam_encode_np(
    x_ND: np.ndarray, codebooks_LKD, beam: int, chunk: int = CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) int64 of the best path found with `beam` paths kept per level, and the
    squared norm of each row's final residual (N,) float32 (sum it in float64)."""
    if beam <= 1:
        return residual_encode_np(x_ND, codebooks_LKD, chunk=chunk, out_resid=False)
    n = x_ND.shape[0]
    books = [np.ascontiguousarray(cb, dtype=np.float32) for cb in codebooks_LKD]
    c_norms = [np.einsum("kd,kd->k", cb, cb) for cb in books]
    codes_NL = np.empty((n, len(books)), np.int64)
    sq_N = np.empty(n, np.float32)
    rows = max(1, chunk // beam)  # a chunk of rows carries up to `beam` paths each
    for s in range(0, n, rows):
        codes_NL[s : s + rows], sq_N[s : s + rows] = _beam_chunk(x_ND[s : s + rows], books, c_norms, beam)
    return codes_NL, sq_N


def _beam_chunk(x_BD: np.ndarray, books, c_norms, beam: int) -> tuple[np.ndarray, np.ndarray]:
    b, d = x_BD.shape
    r_BPD = np.asarray(x_BD, np.float32)[:, None, :].copy()  # P = 1 path to start with
    paths_BPL = np.zeros((b, 1, 0), np.int64)
    for cb_KD, c_norm_K in zip(books, c_norms, strict=True):
        p, k = r_BPD.shape[1], cb_KD.shape[0]
        flat_RD = r_BPD.reshape(b * p, d)
        # the squared error of every extension: ||r||^2 - 2 r.c + ||c||^2
        err_RK = _gemm_rows(flat_RD, cb_KD)
        err_RK *= -2.0
        err_RK += c_norm_K
        err_RK += np.einsum("rd,rd->r", flat_RD, flat_RD)[:, None]
        err_BC = err_RK.reshape(b, p * k)  # candidate c = path * K + code
        keep = min(beam, p * k)
        if keep < p * k:
            cand_BC = np.argpartition(err_BC, keep - 1, axis=1)[:, :keep]
        else:
            cand_BC = np.broadcast_to(np.arange(p * k), (b, p * k))
        cand_err = np.take_along_axis(err_BC, cand_BC, axis=1)
        order = np.lexsort((cand_BC, cand_err), axis=1)  # by error, then by candidate index
        cand_BC = np.take_along_axis(cand_BC, order, axis=1)
        src_BP, code_BP = cand_BC // k, cand_BC % k
        paths_BPL = np.concatenate(
            [np.take_along_axis(paths_BPL, src_BP[:, :, None], axis=1), code_BP[:, :, None]], axis=2
        )
        r_BPD = np.take_along_axis(r_BPD, src_BP[:, :, None], axis=1) - cb_KD[code_BP]
    best = r_BPD[:, 0, :]  # paths are sorted by error: the first is the best
    return paths_BPL[:, 0, :], np.einsum("bd,bd->b", best, best)
