"""The numpy encode kernel (what the catalog's encode pass runs) against a float64 reference,
and the property the pipeline relies on: a row's code never depends on its chunk."""

import numpy as np
import pytest

from semid_dist.math.nearest_np import nearest_code_np, residual_encode_np


def _data(n, d, k, levels, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    books = np.stack([rng.normal(size=(k, d)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)[:levels]])
    return x, books


def test_nearest_code_np_matches_float64_bruteforce():
    x, books = _data(700, 24, 37, 1, 0)
    idx, d2 = nearest_code_np(x, books[0], chunk=128)
    ref = ((x[:, None, :].astype(np.float64) - books[0][None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(idx, ref.argmin(1))
    np.testing.assert_allclose(d2, ref.min(1), rtol=1e-4, atol=1e-4)


def test_residual_encode_np_matches_float64_reference():
    x, books = _data(500, 16, 8, 3, 1)
    codes, resid = residual_encode_np(x, books, chunk=64)
    r = x.astype(np.float64)
    for level, b in enumerate(books.astype(np.float64)):
        want = ((r[:, None, :] - b[None]) ** 2).sum(-1).argmin(1)
        assert np.array_equal(codes[:, level], want)
        r -= b[want]
    np.testing.assert_allclose(resid, r, atol=1e-5)
    _, sq = residual_encode_np(x, books, out_resid=False)
    np.testing.assert_allclose(sq, (r**2).sum(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(256, 768), (16, 32)])
def test_codes_do_not_depend_on_the_chunk(shape):
    """Shard tails, batch boundaries and one-item encodes must give bit-identical codes."""
    k, d = shape
    x, books = _data(3000, d, k, 3, 2)
    whole, whole_sq = residual_encode_np(x, books, out_resid=False)
    for chunk in (1, 3, 7, 100, 1000):
        codes, sq = residual_encode_np(x, books, chunk=chunk, out_resid=False)
        assert np.array_equal(codes, whole) and np.array_equal(sq, whole_sq), chunk
    for i in (0, 5, 2999):
        one, _ = residual_encode_np(x[i : i + 1], books)
        assert np.array_equal(one[0], whole[i])
