"""The streamed k-means fit (exact per-code statistics, Lloyd passes over every item), beam-search
encoding, and the faiss kernel, each against a slow obvious reference; then end to end: the same
IDs however the catalog is sharded or cut into tasks, and the Python API agreeing with the
published IDs."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

from conftest import make_catalog, write_shards
from semid_dist.math.beam import beam_encode_np
from semid_dist.math.nearest_faiss import FaissNearest, FaissRQ
from semid_dist.math.nearest_np import residual_encode_np
from semid_dist.math.nearest_torch import beam_encode
from semid_dist.math.rq_stats import RQStats, Scales, accumulate, fixed_point_scale, lloyd_update, sq_error


def _books(rng, levels, k, d):
    return np.stack([rng.normal(size=(k, d)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)[:levels]])


def _stats(x, books, scales, splits=(0,)):
    """Statistics accumulated over x cut at `splits`, each piece into its own RQStats, then added."""
    total = RQStats.zeros(books.shape[0], books.shape[1], x.shape[1])
    bounds = [*splits, len(x)]
    for a, b in itertools.pairwise(bounds):
        part = RQStats.zeros(books.shape[0], books.shape[1], x.shape[1])
        accumulate(x[a:b], books, scales, part)
        total.add(part)
    return total


def test_lloyd_pass_matches_a_float64_reference():
    """One pass: every level's codes move to the mean of the residuals assigned to them (the
    residuals the greedy encoding leaves), codes nobody chose stay; the squared error is the
    greedy encoding's."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 6)).astype(np.float32)
    books = _books(rng, 3, 9, 6)
    books[2][4] += 50.0  # far from everything: no row picks it
    scales = Scales.for_catalog(float(np.abs(x).max()), books, len(x))
    new = lloyd_update(books, _stats(x, books, scales), scales)

    codes, resid = residual_encode_np(x, books)
    r = x.astype(np.float64)
    for level in range(3):
        for k in range(books.shape[1]):
            rows = codes[:, level] == k
            want = r[rows].mean(0) if rows.any() else books[level][k]
            np.testing.assert_allclose(new[level][k], want, rtol=1e-5, atol=1e-6)
        r = r - books[level][codes[:, level]]
    assert np.array_equal(new[2][4], books[2][4])
    err = sq_error(_stats(x, books, scales), scales)
    assert err == pytest.approx(float((resid.astype(np.float64) ** 2).sum()), rel=1e-5)


def test_statistics_are_bit_identical_however_the_rows_are_cut_or_ordered():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)).astype(np.float32) * 3
    books = _books(rng, 3, 12, 16)
    scales = Scales.for_catalog(float(np.abs(x).max()), books, len(x))
    whole = _stats(x, books, scales)
    perm = rng.permutation(len(x))
    for cut, rows in (((0, 1, 7, 1000, 1999), x), ((0, 333), x[perm]), ((0,), x[::-1].copy())):
        other = _stats(rows, books, scales, cut)
        assert np.array_equal(other.sums_LKD, whole.sums_LKD) and np.array_equal(
            other.counts_LK, whole.counts_LK
        )
        assert other.sq_err == whole.sq_err


def test_fixed_point_scale_leaves_room_for_every_row():
    for bound, n in ((1.0, 10**8), (37.5, 10**6), (1e-3, 10), (8.0, 1)):
        s = fixed_point_scale(bound, n)
        assert s == 2.0 ** round(np.log2(s))  # a power of two: scaling a float is exact
        assert n * bound * s <= 2.0**62 and s <= 2.0**40
        assert n * bound * s > 2.0**60 or s == 2.0**40  # and not needlessly coarse


def test_beam_search_finds_the_best_path_and_beam_1_is_greedy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    books = _books(rng, 3, 5, 8)
    codes, sq = beam_encode_np(x, books, beam=125)  # 5^3 paths: the search is exhaustive
    for i in range(len(x)):
        errs = {
            p: float(((x[i].astype(np.float64) - sum(books[lv][c] for lv, c in enumerate(p))) ** 2).sum())
            for p in itertools.product(range(5), repeat=3)
        }
        assert errs[tuple(codes[i])] == pytest.approx(min(errs.values()), rel=1e-5)
    greedy, greedy_sq = residual_encode_np(x, books, out_resid=False)
    one, one_sq = beam_encode_np(x, books, beam=1)
    assert np.array_equal(one, greedy) and np.array_equal(one_sq, greedy_sq)
    four, four_sq = beam_encode_np(x, books, beam=4)
    assert four_sq.sum() < greedy_sq.sum() and (four_sq <= greedy_sq + 1e-5).all()
    # a row's codes do not depend on the rows it is encoded with
    assert np.array_equal(beam_encode_np(x, books, 4, chunk=3)[0], four)
    assert np.array_equal(beam_encode_np(x[7:8], books, 4)[0][0], four[7])
    # the torch search (GPUs) is the same search (here in float64 on the CPU)
    t_codes, t_sq = beam_encode(
        torch.from_numpy(x).double(), [torch.from_numpy(b).double() for b in books], 4
    )
    assert np.array_equal(t_codes.numpy(), four)


def test_faiss_kernel_gives_the_numpy_codes():
    """faiss-cpu runs the code path faiss-gpu runs on GPUs (same API, the index on a GPU)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    books = _books(rng, 3, 40, 24)
    rq = FaissRQ(books, gpu=False)
    codes, sq = rq.encode(x)
    want, want_sq = residual_encode_np(x, books, out_resid=False)
    assert np.array_equal(codes, want)
    np.testing.assert_allclose(sq, want_sq, rtol=1e-4, atol=1e-5)
    scales = Scales.for_catalog(float(np.abs(x).max()), books, len(x))
    ours, theirs = RQStats.zeros(3, 40, 24), RQStats.zeros(3, 40, 24)
    accumulate(x, books, scales, ours)
    accumulate(x, books, scales, theirs, FaissNearest(gpu=False).quantizer(books))
    assert np.array_equal(ours.sums_LKD, theirs.sums_LKD) and ours.sq_err == theirs.sq_err


# --- end to end ----------------------------------------------------------------------------------

N_ITEMS, DIM = 1500, 16


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    ids, x = make_catalog(N_ITEMS, DIM, seed=11, n_clusters=12)
    write_shards(str(root / "one"), ids, x, 1)
    write_shards(str(root / "seven"), ids, x[:, :], 7)
    return root, ids, x


def _run(data: str, out: str, *extra: str) -> dict:
    from semid_dist.cli import main

    args = ["train", "--data_path", data, "--output_dir", out, "--log_dir", out + "-logs", "--mode", "kmeans"]
    assert main([*args, "--n_layers", "3", "--n_clusters", "24", "--max_iters", "8", *extra]) == 0
    with open(os.path.join(out, "training_results.json")) as f:
        return json.load(f)


def _mapping(out: str) -> dict:
    with open(os.path.join(out, "semantic_id_mappings.json")) as f:
        return json.load(f)


def test_stream_ids_do_not_depend_on_sharding_or_tasks(ray_session, catalogs, tmp_path, monkeypatch):
    from semid_dist.catalog import plumbing

    root, _, _ = catalogs
    stream = ["--kmeans_fit", "stream", "--kmeans_stream_passes", "3", "--sample_per_centroid", "8"]
    first = _run(str(root / "one"), str(tmp_path / "a"), *stream)
    assert first["training"]["fit"] == "stream" and len(first["training"]["stream"]["passes"]) >= 2
    errs = [p["sq_err_before"] for p in first["training"]["stream"]["passes"]]
    assert errs[1] < errs[0]  # the passes lower the error of the sample fit
    monkeypatch.setattr(plumbing, "read_tasks", lambda: 5)  # another cut into read tasks
    second = _run(str(root / "seven"), str(tmp_path / "b"), *stream)
    assert _mapping(str(tmp_path / "a")) == _mapping(str(tmp_path / "b"))
    assert second["training"]["stream"]["passes"] == [
        {**p, "seconds": q["seconds"]}
        for p, q in zip(
            first["training"]["stream"]["passes"], second["training"]["stream"]["passes"], strict=True
        )
    ]
    sample = _run(
        str(root / "one"), str(tmp_path / "c"), "--kmeans_fit", "sample", "--sample_per_centroid", "8"
    )
    assert sample["training"]["fit"] == "sample" and "stream" not in sample["training"]
    rel = "relative_reconstruction_error"
    assert first["metrics"][rel] < sample["metrics"][rel]


def test_auto_streams_exactly_when_the_sample_is_cut(ray_session, catalogs, tmp_path):
    from semid_dist.config import Config
    from semid_dist.modes import kmeans

    cfg = Config(data_path="x", output_dir="y", mode="kmeans", n_clusters=256)
    assert kmeans.fit_kind(cfg, 768, 1_000_000) == "sample"  # the 3 x 256 default: 65,536 rows fit
    assert kmeans.fit_kind(cfg.replace(n_clusters=2048), 768, 1_000_000) == "stream"  # cut to 1 GB
    assert kmeans.fit_kind(cfg.replace(n_clusters=2048, kmeans_fit="sample"), 768, 1_000_000) == "sample"
    root, _, _ = catalogs
    cut = _run(str(root / "one"), str(tmp_path / "cut"), "--kmeans_sample_gb", "0.00003")  # 488 rows
    assert cut["training"]["fit"] == "stream" and cut["training"]["sample_size"] < N_ITEMS


def test_beam_is_stored_with_the_tokenizer_and_the_api_agrees(ray_session, catalogs, tmp_path):
    from semid_dist import load_tokenizer
    from semid_dist.cli import main

    root, ids, x = catalogs
    out = str(tmp_path / "beam")
    beam = _run(str(root / "one"), out, "--beam_size", "4")
    greedy = _run(str(root / "one"), str(tmp_path / "greedy"))
    rel = "relative_reconstruction_error"
    assert beam["metrics"][rel] < greedy["metrics"][rel]
    iters = beam["training"]["beam_refine"]["iterations"]  # the fit assigned by beam search too
    assert len(iters) >= 2 and iters[-1]["sq_err_before"] < iters[0]["sq_err_before"]
    assert "beam_refine" not in greedy["training"]
    tok = load_tokenizer(os.path.join(out, "final_model.pt"))
    assert tok.beam_size == 4
    published = _mapping(out)
    codes = tok.encode(x)
    assert all(published[str(i)][:3] == c.tolist() for i, c in zip(ids, codes, strict=True))
    # semid encode applies the stored beam to another catalog layout: the same IDs
    again = str(tmp_path / "encoded")
    tok_path = os.path.join(out, "final_model.pt")
    assert (
        main(
            [
                "encode",
                "--data_path",
                str(root / "seven"),
                "--output_dir",
                again,
                "--tokenizer",
                tok_path,
                "--log_dir",
                again + "-logs",
            ]
        )
        == 0
    )
    assert _mapping(again) == published
