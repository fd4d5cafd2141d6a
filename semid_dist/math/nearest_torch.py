"""The torch kernels of nearest-code search (math/nearest.py chooses them: on CUDA, and for the
RQ-VAE's own training step), chunked so that memory stays flat.

These are torch on whatever device the tensors are on; they do not switch to another kernel
by themselves. The CPU's kernel is numpy's (nearest_np.py, beam.py), chosen by
nearest.backend_for, so that the Python API and the catalog's encode pass give the same codes.
"""

from __future__ import annotations

import numpy as np
import torch

from semid_dist.math.nearest import Nearest, Quantizer

# 16k+ rows per chunk keeps the GEMM efficient; the distance block is chunk x K floats.
DEFAULT_CHUNK = 32768


def nearest_code(
    x_ND: torch.Tensor, codebook_KD: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codeword (squared L2) for every row, and that squared distance.

    Ties go to the lowest index (torch.argmin semantics), which keeps results deterministic.
    """
    assert x_ND.ndim == 2 and codebook_KD.ndim == 2 and x_ND.shape[1] == codebook_KD.shape[1]
    n = x_ND.shape[0]
    idx_N = torch.empty(n, dtype=torch.long, device=x_ND.device)
    dist_N = torch.empty(n, dtype=x_ND.dtype, device=x_ND.device)
    c_norm_K = (codebook_KD * codebook_KD).sum(1)
    for start in range(0, n, chunk):
        xb = x_ND[start : start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row for the argmin.
        d_BK = torch.addmm(c_norm_K.unsqueeze(0), xb, codebook_KD.T, beta=1.0, alpha=-2.0)
        best, arg = d_BK.min(dim=1)
        idx_N[start : start + chunk] = arg
        dist_N[start : start + chunk] = (best + (xb * xb).sum(1)).clamp_min_(0)
    return idx_N, dist_N


def residual_encode(
    x_ND: torch.Tensor, codebooks: list[torch.Tensor], chunk: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual quantization: codes (N, L) and the final residual (N, D).

    Level l picks the codeword nearest to the residual left by levels < l.
    """
    n = x_ND.shape[0]
    codes_NL = torch.empty(n, len(codebooks), dtype=torch.long, device=x_ND.device)
    resid_ND = x_ND.clone()
    for start in range(0, n, chunk):
        r = resid_ND[start : start + chunk]
        for level, cb_KD in enumerate(codebooks):
            idx, _ = nearest_code(r, cb_KD, chunk=chunk)
            codes_NL[start : start + chunk, level] = idx
            r -= cb_KD[idx]  # in place on the chunk view: no N x D temporary
    return codes_NL, resid_ND


def residual_decode(codes_NL: torch.Tensor, codebooks: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the selected codewords over levels: the reconstruction of residual_encode."""
    out = torch.zeros(
        codes_NL.shape[0], codebooks[0].shape[1], dtype=codebooks[0].dtype, device=codebooks[0].device
    )
    for level, cb_KD in enumerate(codebooks):
        out += cb_KD[codes_NL[:, level]]
    return out


def beam_encode(
    x_ND: torch.Tensor, codebooks: list[torch.Tensor], beam: int, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam-search residual encoding (math/beam.py describes it): codes (N, L) and each row's
    squared final error (N,). The torch version of beam.py's numpy search, with the same
    ordering of ties."""
    n, d = x_ND.shape
    codes_NL = torch.empty(n, len(codebooks), dtype=torch.long, device=x_ND.device)
    sq_N = torch.empty(n, dtype=x_ND.dtype, device=x_ND.device)
    rows = max(1, chunk // beam)
    for s in range(0, n, rows):
        r_BPD = x_ND[s : s + rows, None, :].clone()
        b = r_BPD.shape[0]
        paths_BPL = torch.zeros(b, 1, 0, dtype=torch.long, device=x_ND.device)
        for cb_KD in codebooks:
            p, k = r_BPD.shape[1], cb_KD.shape[0]
            flat = r_BPD.reshape(b * p, d)
            err = torch.addmm((cb_KD * cb_KD).sum(1).unsqueeze(0), flat, cb_KD.T, beta=1.0, alpha=-2.0)
            err = (err + (flat * flat).sum(1, keepdim=True)).reshape(b, p * k)
            # stable sort: equal errors keep the lower candidate index (path rank, then code)
            cand = torch.sort(err, dim=1, stable=True).indices[:, : min(beam, p * k)]
            src, code = cand // k, cand % k
            paths_BPL = torch.cat(
                [
                    torch.gather(paths_BPL, 1, src[:, :, None].expand(-1, -1, paths_BPL.shape[2])),
                    code[:, :, None],
                ],
                dim=2,
            )
            r_BPD = torch.gather(r_BPD, 1, src[:, :, None].expand(-1, -1, d)) - cb_KD[code]
        codes_NL[s : s + rows] = paths_BPL[:, 0, :]
        sq_N[s : s + rows] = (r_BPD[:, 0, :] ** 2).sum(1)
    return codes_NL, sq_N


class TorchNearest(Nearest):
    """torch on one device (CUDA in the product). put() moves the data there once, so a Lloyd
    run then moves only the centroids and the indices per iteration."""

    def __init__(self, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.name = f"torch ({self.device})"

    def put(self, x_ND):
        return torch.as_tensor(x_ND).to(self.device)

    def assign(self, x_ND, codes_KD) -> tuple[np.ndarray, np.ndarray]:
        idx_N, d2_N = nearest_code(self.put(x_ND), self.put(codes_KD))
        return idx_N.cpu().numpy(), d2_N.cpu().numpy()

    def quantizer(self, codebooks_LKD, beam: int = 1) -> TorchQuantizer:
        return TorchQuantizer([self.put(cb) for cb in codebooks_LKD], beam, self.device)


class TorchQuantizer(Quantizer):
    def __init__(self, books: list[torch.Tensor], beam: int, device: torch.device) -> None:
        self.books, self.beam, self.device = books, beam, device

    def nearest(self, r_BD, level: int) -> np.ndarray:
        return nearest_code(torch.as_tensor(r_BD).to(self.device), self.books[level])[0].cpu().numpy()

    def encode(self, x_ND) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, L) and each row's squared error: float32 with a beam, else float64 (the
        float32 residual squared and summed in float64)."""
        x_ND = torch.as_tensor(x_ND).to(self.device)
        if self.beam > 1:
            codes_NL, sq_err_N = beam_encode(x_ND, self.books, self.beam)
        else:
            codes_NL, resid_ND = residual_encode(x_ND, self.books)
            sq_err_N = (resid_ND.double() ** 2).sum(1)
        return codes_NL.cpu().numpy(), sq_err_N.cpu().numpy()
