"""Nearest-code search: one interface, one backend per device, chosen in one place.

Everything that assigns vectors to codes (the k-means fit, the streamed fit's statistics, the
encode pass, Tokenizer.encode, the RQ-VAE's encode) goes through a backend:

    be = backend_for(device)                      # the choice, from the device, made here only
    idx_N, d2_N = be.assign(be.put(x_ND), c_KD)   # one codebook that changes (Lloyd iterations)
    q = be.quantizer(codebooks_LKD, beam)         # codebooks that stay (encoding)
    codes_NL, sq_N = q.encode(x_ND)               # greedy residual codes, or beam search
    idx_B = q.nearest(r_BD, level)                # one level's greedy codes (the streamed fit)

Inputs are numpy arrays or torch tensors; results are numpy arrays, whatever the backend.

- **numpy** (nearest_np.py, beam.py) on the CPU, everywhere: the encode pass runs it in Ray
  tasks that never import torch, and numpy's sgemm was the faster on the CPUs benchmarked, so
  the Python API reproduces the published codes bit for bit. Why not faiss-cpu or torch there:
  docs/kmeans.md ("The assignment kernels").
- **torch** (nearest_torch.py) on CUDA (and any other torch device).
- **faiss** (nearest_faiss.py) on CUDA where faiss-gpu is installed: exact flat indexes over
  codebooks that stay (the encode actors, Tokenizer.encode on CUDA, the stream passes' tasks).
  Lloyd's centroids change every iteration and beam search is not a flat search, so those stay
  with torch on the device.

A backend keeps the arithmetic of its kernels (dtype, BLAS calls, order of the sums): a row's
codes depend on the backend, never on the caller.
"""

from __future__ import annotations

import numpy as np


def as_numpy(x) -> np.ndarray:
    """A numpy view (or copy, off the CPU) of an array or a torch tensor."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class Quantizer:
    """Residual encoding with codebooks (L, K, D) that stay; beam: code paths kept per level
    (1: greedy)."""

    beam: int = 1

    def nearest(self, r_BD, level: int) -> np.ndarray:
        """The nearest code (int64) of every row at this level: one greedy step."""
        raise NotImplementedError

    def encode(self, x_ND) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, L) int64 and each row's squared final error (N,)."""
        raise NotImplementedError


class Nearest:
    """Nearest-code search on one device."""

    name = ""

    def put(self, x_ND):
        """x_ND where this backend computes (a GPU tensor, say): put data that is assigned
        many times once."""
        return x_ND

    def assign(self, x_ND, codes_KD) -> tuple[np.ndarray, np.ndarray]:
        """Index (int64) of the nearest code of every row, and that squared distance. Ties go
        to the lowest index."""
        raise NotImplementedError

    def quantizer(self, codebooks_LKD, beam: int = 1) -> Quantizer:
        raise NotImplementedError


def backend_for(device=None, faiss: bool = True) -> Nearest:
    """The backend for a device ("cpu", "cuda", "cuda:1", a torch.device; None is the CPU).
    faiss=False: torch on CUDA even where faiss-gpu is installed (the RQ-VAE encodes its
    latents where they are, on the device)."""
    name = "cpu" if device is None else str(device)
    if name == "cpu":
        from semid_dist.math.nearest_np import NumpyNearest

        return NumpyNearest()
    if faiss and name.startswith("cuda"):
        from semid_dist.math.nearest_faiss import gpu_count

        if gpu_count() > 0:
            from semid_dist.math.nearest_faiss import FaissNearest

            return FaissNearest(gpu=True)
    from semid_dist.math.nearest_torch import TorchNearest

    return TorchNearest(name)
