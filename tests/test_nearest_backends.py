"""Nearest-code search has one interface and one place that picks its backend (math/nearest.py):
every backend gives the numpy reference's codes, and nothing else in the package picks a
kernel."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from semid_dist.math.nearest import backend_for
from semid_dist.math.nearest_faiss import FaissNearest
from semid_dist.math.nearest_np import NumpyNearest
from semid_dist.math.nearest_torch import TorchNearest

PACKAGE = Path(__file__).resolve().parent.parent / "semid_dist"


def _backends():
    return [NumpyNearest(), TorchNearest("cpu"), FaissNearest(gpu=False)]


def _data(seed=0, n=600, d=16, k=24, levels=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    books = np.stack([rng.normal(size=(k, d)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)[:levels]])
    return x, books


def _greedy_reference(x, books):
    """Greedy residual codes in float64, the obvious way."""
    r = x.astype(np.float64)
    codes = []
    for cb in books.astype(np.float64):
        idx = ((r[:, None, :] - cb[None]) ** 2).sum(-1).argmin(1)
        codes.append(idx)
        r = r - cb[idx]
    return np.stack(codes, 1), (r**2).sum(1)


def test_the_choice_follows_the_device():
    assert isinstance(backend_for("cpu"), NumpyNearest)
    assert isinstance(backend_for(None), NumpyNearest)
    assert isinstance(backend_for(torch.device("cpu")), NumpyNearest)
    # CUDA: faiss-gpu's indexes where faiss sees a GPU, else torch; the RQ-VAE asks for torch
    assert isinstance(backend_for("cuda", faiss=False), TorchNearest)
    assert not isinstance(backend_for("cuda", faiss=False), FaissNearest)
    from semid_dist.math.nearest_faiss import gpu_count

    want = FaissNearest if gpu_count() > 0 else TorchNearest
    assert type(backend_for("cuda")) is want


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
def test_every_backend_gives_the_reference_codes(backend):
    x, books = _data()
    want_codes, want_sq = _greedy_reference(x, books)
    idx, d2 = backend.assign(backend.put(x), books[0])
    ref0 = ((x[:, None, :].astype(np.float64) - books[0][None].astype(np.float64)) ** 2).sum(-1)
    assert idx.dtype == np.int64 and np.array_equal(idx, ref0.argmin(1))
    np.testing.assert_allclose(d2, ref0.min(1), rtol=1e-4, atol=1e-4)

    q = backend.quantizer(books)
    codes, sq = q.encode(x)
    assert isinstance(codes, np.ndarray) and np.array_equal(codes, want_codes)
    np.testing.assert_allclose(sq, want_sq, rtol=1e-4, atol=1e-4)
    r = x.copy()
    for level in range(len(books)):  # one level at a time, as the streamed fit asks for them
        assert np.array_equal(q.nearest(r, level), want_codes[:, level])
        r -= books[level][want_codes[:, level]]


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
def test_every_backend_searches_the_same_beam(backend):
    x, books = _data(seed=1, n=300)
    want, want_sq = NumpyNearest().quantizer(books, 4).encode(x)
    codes, sq = backend.quantizer(books, 4).encode(x)
    assert np.array_equal(codes, want)
    np.testing.assert_allclose(sq, want_sq, rtol=1e-4, atol=1e-4)
    greedy_sq = NumpyNearest().quantizer(books).encode(x)[1]
    assert want_sq.sum() < greedy_sq.sum()  # the beam found better paths than greedy encoding


def test_the_tokenizer_and_the_encode_pass_share_the_cpu_kernel():
    """Tokenizer.encode on the CPU and the encode pass's tasks (a KmeansTokenizer's numpy form)
    give the same codes and errors, bit for bit, greedy and with a beam."""
    from semid_dist.tokenizer import Tokenizer

    x, books = _data(seed=2)
    for beam in (1, 3):
        tok = Tokenizer("kmeans", {"beam_size": beam}, codebooks_LKD=torch.from_numpy(books))
        assert type(tok).__name__ == "KmeansTokenizer" and tok.beam_size == beam
        codes, sq = tok.encode_with_error(x)
        task_codes, task_sq = tok.cpu_encoder().encode_with_error(x)
        assert np.array_equal(codes, task_codes) and np.array_equal(sq, task_sq)


def test_nothing_else_in_the_package_picks_a_kernel():
    """Backends are built, and the kernels of encoding called, only inside math/nearest*.py and
    math/beam.py (the numpy backend's beam search): everything else asks backend_for."""
    pattern = re.compile(
        r"\b(NumpyNearest|TorchNearest|FaissNearest|FaissRQ|gpu_count|beam_encode_np|beam_encode|"
        r"residual_encode_np|residual_encode|nearest_code_np|_nearest_chunk)\b"
    )
    inside = {"nearest.py", "nearest_np.py", "nearest_torch.py", "nearest_faiss.py", "beam.py"}
    hits = [
        f"{p.relative_to(PACKAGE)}: {m.group(0)}"
        for p in PACKAGE.rglob("*.py")
        if not (p.parent.name == "math" and p.name in inside)
        for m in pattern.finditer(p.read_text())
    ]
    assert not hits, hits
    assert pattern.search("codes = residual_encode_np(x, books)")  # the check can fail
