"""The math layer against slow, obvious numpy references."""

import numpy as np
import pytest
import torch

from semid_dist.math.dedup import dedup_codes
from semid_dist.math.kmeans import fit_kmeans, fit_residual_codebooks, kmeans_objective, lloyd
from semid_dist.math.metrics import collision_stats, level_stats, quality_report
from semid_dist.math.nearest_torch import TorchNearest, nearest_code, residual_decode, residual_encode


def _rand(n, d, seed):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


def test_nearest_code_matches_bruteforce_numpy():
    x, c = _rand(1000, 24, 0), _rand(37, 24, 1)
    idx, d2 = nearest_code(x, c, chunk=128)  # several chunks
    ref = ((x.numpy()[:, None, :].astype(np.float64) - c.numpy()[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(idx.numpy(), ref.argmin(1))
    np.testing.assert_allclose(d2.numpy(), ref.min(1), rtol=1e-4, atol=1e-4)


def test_residual_encode_decode_match_reference():
    x = _rand(500, 16, 2)
    books = [_rand(8, 16, 3 + i) * s for i, s in enumerate([1.0, 0.5, 0.25])]
    codes, resid = residual_encode(x, books, chunk=64)
    r = x.numpy().astype(np.float64).copy()
    for level, b in enumerate(books):
        bn = b.numpy().astype(np.float64)
        want = ((r[:, None, :] - bn[None]) ** 2).sum(-1).argmin(1)
        assert np.array_equal(codes[:, level].numpy(), want)
        r -= bn[want]
    np.testing.assert_allclose(resid.numpy(), r, atol=1e-5)
    np.testing.assert_allclose(residual_decode(codes, books).numpy(), x.numpy() - r, atol=1e-5)


def test_lloyd_step_matches_numpy_and_lowers_objective():
    x, init = _rand(400, 8, 4), _rand(5, 8, 5)
    one = lloyd(x, init, iters=1)
    xn, cn = x.numpy().astype(np.float64), init.numpy().astype(np.float64)
    assign = ((xn[:, None] - cn[None]) ** 2).sum(-1).argmin(1)
    for k in range(5):
        if (assign == k).any():
            np.testing.assert_allclose(one[k].numpy(), xn[assign == k].mean(0), atol=1e-5)
    many = lloyd(x, init, iters=20)
    assert kmeans_objective(x, many) <= kmeans_objective(x, one) + 1e-6 <= kmeans_objective(x, init) + 1e-6


def test_empty_clusters_are_reseeded():
    x = _rand(300, 4, 6)
    init = torch.cat([x[:3], torch.full((3, 4), 100.0)])  # three centers nobody is near
    out = lloyd(x, init, iters=5)
    idx, _ = nearest_code(x, out)
    assert torch.bincount(idx, minlength=6).min() > 0


@pytest.mark.parametrize("progressive", [True, False])
def test_fit_kmeans_beats_random_centers_and_is_deterministic(progressive):
    # 8 well separated blobs: a good k-means finds them all
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(8, 32)) * 5
    x = torch.from_numpy((centers[rng.integers(8, size=800)] + rng.normal(size=(800, 32))).astype(np.float32))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = fit_kmeans(x, 8, 20, g1, progressive=progressive)
    b = fit_kmeans(x, 8, 20, g2, progressive=progressive)
    assert torch.equal(a, b)
    random_centers = x[torch.randperm(800, generator=torch.Generator().manual_seed(0))[:8]]
    assert kmeans_objective(x, a) < 0.6 * kmeans_objective(x, random_centers)
    idx, _ = nearest_code(x, a)
    assert torch.bincount(idx, minlength=8).min() > 50  # every blob got its own center


def test_fit_kmeans_rejects_more_centroids_than_points():
    with pytest.raises(ValueError):
        fit_kmeans(_rand(5, 3, 0), 6, 3, torch.Generator().manual_seed(0))


def test_residual_codebooks_reduce_error_level_by_level():
    x = _rand(2000, 16, 8)
    books = fit_residual_codebooks(x, 3, 16, 10, seed=0)
    errs = []
    for level in range(1, 4):
        _, resid = residual_encode(x, books[:level])
        errs.append(float((resid**2).sum()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[0] < float((x**2).sum())


def test_full_dim_levels_fit_the_top_levels_in_full_dimension():
    """kmeans_full_dim_levels=1: level 0 is exactly the full-dimension fit (k-means++ on the
    strided seed points, Lloyd on all), the later levels stay progressive."""
    from semid_dist.math import kmeans as km

    x = _rand(3000, 16, 11)
    k = 8
    mixed = fit_residual_codebooks(x.clone(), 2, k, 10, seed=5, full_dim_levels=1)
    default = fit_residual_codebooks(x.clone(), 2, k, 10, seed=5)
    level0 = fit_kmeans(
        x.clone(),
        k,
        10,
        torch.Generator().manual_seed(5),
        progressive=False,
        seed_points=km.SEED_PER_CENTROID * k,
    )
    assert torch.equal(mixed[0], level0)
    assert not torch.equal(mixed[0], default[0])
    # the no-progressive switch still means plain k-means everywhere
    plain = fit_residual_codebooks(x.clone(), 2, k, 10, seed=5, progressive=False, full_dim_levels=1)
    assert torch.equal(
        plain[0], fit_kmeans(x.clone(), k, 10, torch.Generator().manual_seed(5), progressive=False)
    )


def test_fit_with_assignments_in_torch_matches_the_numpy_fit():
    """backend= runs the Lloyd and level assignments with that nearest-code backend (torch on a
    GPU in production); here torch on the CPU. Same algorithm, other float32 kernels: on
    clustered data the codebooks agree to float noise and the objective is the same."""
    from conftest import make_catalog

    torch_calls = []

    class CountingTorch(TorchNearest):
        def assign(self, x_ND, codes_KD):
            torch_calls.append(1)
            return super().assign(x_ND, codes_KD)

    _, x_np = make_catalog(3000, 24, seed=4, n_clusters=6)
    x = torch.from_numpy(x_np)
    ref = fit_residual_codebooks(x.clone(), 2, 8, 10, seed=1, full_dim_levels=1)  # numpy's kernel
    dev = fit_residual_codebooks(x.clone(), 2, 8, 10, seed=1, full_dim_levels=1, backend=CountingTorch("cpu"))
    assert len(torch_calls) > 10  # every Lloyd iteration and each level's assignment
    for a, b in zip(ref, dev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _, r_ref = residual_encode(x, ref)
    _, r_dev = residual_encode(x, dev)
    assert float((r_dev**2).sum()) == pytest.approx(float((r_ref**2).sum()), rel=1e-4)


def _dedup_reference(ids, codes):
    groups = {}
    for i, row in sorted(zip(ids.tolist(), map(tuple, codes.tolist()), strict=True)):
        groups.setdefault(row, []).append(i)
    rank = {i: r for members in groups.values() for r, i in enumerate(members)}
    return np.array([rank[i] for i in ids.tolist()])


# Codes as they come (small, non-negative: sorted through one packed int64 key), and two kinds
# of rows the packed key cannot hold (negative values, value ranges past 2**63: a lexsort).
ROWS = {
    "codes": lambda r: r,
    "uint64": lambda r: r.astype(np.uint64),
    "negative": lambda r: r - 2,
    "huge": lambda r: r * 2**40,
}


@pytest.mark.parametrize("kind", ROWS)
def test_dedup_matches_reference_and_ignores_row_order(kind):
    from semid_dist.math.dedup import packed_key

    rng = np.random.default_rng(9)
    ids = rng.permutation(5000)[:1000].astype(np.int64) + 10
    codes = ROWS[kind](rng.integers(0, 4, size=(1000, 3)))  # many collisions
    assert (packed_key(codes) is None) == (kind in ("negative", "huge"))
    got = dedup_codes(ids, codes)
    assert np.array_equal(got, _dedup_reference(ids, codes))
    full = np.concatenate([codes, got[:, None]], 1)
    assert np.unique(full, axis=0).shape[0] == 1000
    perm = rng.permutation(1000)
    assert np.array_equal(dedup_codes(ids[perm], codes[perm]), got[perm])


def test_metrics_match_definitions():
    codes = np.array([[0, 1], [0, 1], [0, 2], [3, 1]])
    st = collision_stats(codes)
    assert st["collision_rate"] == pytest.approx(1 - 3 / 4) and st["max_bucket"] == 2
    lv = level_stats(codes, 4)
    assert [x["codes_used"] for x in lv] == [2, 2] and [x["dead_codes"] for x in lv] == [2, 2]
    p = np.array([3, 1]) / 4
    assert lv[0]["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    q = quality_report(codes, 4, sq_err_sum=1.0, sq_norm_sum=4.0)
    assert q["relative_reconstruction_error"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ROWS)
def test_row_groups_match_numpy_unique(kind):
    from semid_dist.math.dedup import row_groups

    rng = np.random.default_rng(7)
    rows = ROWS[kind](rng.integers(0, 4, size=(5000, 3)))
    group, first, order = row_groups(rows)
    uniq, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    assert np.array_equal(group, inverse.ravel())  # same numbering: lexicographic order
    assert first.sum() == len(uniq) and np.array_equal(np.bincount(group), counts)
    assert np.array_equal(rows[order][first], uniq)
    st = collision_stats(rows)
    assert st["distinct_ids"] == len(uniq) and st["max_bucket"] == counts.max()


def test_prefix_tree_paths_are_exactly_the_ids():
    from semid_dist.math.prefix_tree import paths, prefix_tree

    rng = np.random.default_rng(9)
    sid = np.unique(rng.integers(0, 4, size=(300, 4)), axis=0)
    sid = sid[rng.permutation(len(sid))]
    levels = prefix_tree(sid)
    assert [lv.depth for lv in levels] == [0, 1, 2, 3]
    assert paths(levels) == {tuple(r) for r in sid.tolist()}
    assert levels[0].prefixes_PD.shape == (1, 0) and levels[0].next_C.tolist() == sorted(set(sid[:, 0]))
    assert paths(prefix_tree(sid[:-1])) == {tuple(r) for r in sid[:-1].tolist()}
