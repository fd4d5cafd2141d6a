"""Nearest-code search with faiss: one exact flat L2 index per level, on the CPU or on a GPU.

FaissNearest is nearest.backend_for's choice on CUDA where faiss-gpu is installed, for codebooks
that stay (the encode actors, the streamed fit's tasks and Tokenizer.encode on CUDA); without
faiss-gpu, those run torch on CUDA. Lloyd's assignments and beam search stay with torch on the
device (TorchNearest, which it extends). On the CPU the numpy kernel (nearest_np.py) is the
product's, measured the faster there; this module runs on faiss-cpu only in the tests, which
check it against numpy, since faiss-cpu and faiss-gpu share the API and only the index's
placement differs.
"""

from __future__ import annotations

import numpy as np

from semid_dist.math.nearest import Quantizer, as_numpy
from semid_dist.math.nearest_torch import TorchNearest


def gpu_count() -> int:
    """GPUs faiss can use here (0 with faiss-cpu, or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class FaissRQ:
    """Greedy residual encoding with faiss flat indexes over the codebooks (L, K, D)."""

    def __init__(self, codebooks_LKD: np.ndarray, gpu: bool = False) -> None:
        import faiss

        self.books = np.ascontiguousarray(codebooks_LKD, np.float32)
        self._res = faiss.StandardGpuResources() if gpu else None  # must outlive the indexes
        self.indexes = []
        for cb_KD in self.books:
            index = faiss.IndexFlatL2(cb_KD.shape[1])
            index.add(cb_KD)
            self.indexes.append(faiss.index_cpu_to_gpu(self._res, 0, index) if gpu else index)

    def nearest(self, r_BD: np.ndarray, level: int) -> np.ndarray:
        """The nearest code of every row at this level (int64)."""
        _, idx = self.indexes[level].search(np.ascontiguousarray(r_BD, np.float32), 1)
        return idx[:, 0].astype(np.int64)

    def encode(self, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, L) int64 and each row's squared final error (N,) float32."""
        r_ND = np.array(x_ND, np.float32)
        codes_NL = np.empty((len(r_ND), len(self.indexes)), np.int64)
        for level, cb_KD in enumerate(self.books):
            codes_NL[:, level] = idx_N = self.nearest(r_ND, level)
            r_ND -= cb_KD[idx_N]
        return codes_NL, np.einsum("nd,nd->n", r_ND, r_ND)


class FaissNearest(TorchNearest):
    """faiss's flat indexes for codebooks that stay (greedy encoding, one level's search); the
    rest is TorchNearest's on the same device (the GPU; the CPU with faiss-cpu, in the tests)."""

    def __init__(self, gpu: bool = True) -> None:
        super().__init__("cuda" if gpu else "cpu")
        self.gpu = gpu
        self.name = "faiss-gpu" if gpu else "faiss-cpu"

    def quantizer(self, codebooks_LKD, beam: int = 1) -> Quantizer:
        if beam > 1:  # a beam is not a flat search: torch's on the device
            return super().quantizer(codebooks_LKD, beam)
        return FaissQuantizer(FaissRQ(as_numpy(codebooks_LKD), gpu=self.gpu))


class FaissQuantizer(Quantizer):
    def __init__(self, rq: FaissRQ) -> None:
        self.rq = rq

    def nearest(self, r_BD, level: int) -> np.ndarray:
        return self.rq.nearest(as_numpy(r_BD), level)

    def encode(self, x_ND) -> tuple[np.ndarray, np.ndarray]:
        """Codes and each row's squared error (float32 per row, as float64)."""
        codes, sq = self.rq.encode(as_numpy(x_ND))
        return codes, sq.astype(np.float64)
