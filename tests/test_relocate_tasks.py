"""Relocation in Ray tasks (pipeline/relocation.py) against relocate() over all rows at once."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_relocate import catalog

from semid_dist.catalog.plumbing import lists, name_lists
from semid_dist.math.relocate import relocate
from semid_dist.pipeline import relocation
from semid_dist.pipeline.relocation import CandidateSpool, prefix_buckets

CODES = {1: 600, 2: 30, 3: 10}  # codes per level, by the number of levels


def result_blocks(ids, codes, cand, err, n_blocks, names=None):
    """The rows as the encode pass's result blocks: one row of flat lists per block."""
    out = []
    for rows in np.array_split(np.arange(len(ids)), n_blocks):
        cols = {
            "ids": lists(ids[rows], pa.int64()),
            "codes": lists(codes[rows].astype(np.uint16).ravel(), pa.uint16()),
            "cand": lists(cand[rows].astype(np.uint16).ravel(), pa.uint16()),
            "cand_err": lists(err[rows].ravel(), pa.float32()),
        }
        if names is not None:
            cols["names"] = name_lists(pa.array([names[i] for i in rows]))
        out.append(pa.table(cols))
    return out


@pytest.mark.parametrize(
    "seed,n_levels,task_rows,n_blocks,ties,strings",
    [
        (0, 3, 200, 7, False, False),  # many buckets, many blocks
        (1, 3, 150, 1, True, False),  # one block, ties settled by ItemID then code
        (2, 2, 100, 5, True, True),  # string ItemIDs: ties by their bytes, not their keys
        (3, 3, 10_000, 4, False, False),  # one bucket
        (4, 1, 50, 3, False, False),  # one level: one prefix, one bucket
    ],
)
def test_tasks_equal_the_driver_version(
    ray_session, monkeypatch, seed, n_levels, task_rows, n_blocks, ties, strings
):
    monkeypatch.setattr(relocation, "FLUSH_BYTES", 20_000)  # several pieces per bucket
    # 3 candidates, about one item per L-code tuple: crowded prefixes, where many movers run out
    # of free candidates
    ids, codes, cand, err, *_ = catalog(seed, n=1500, L=n_levels, K=CODES[n_levels], k=3, ties=ties)
    names = np.array([f"item-{i}" for i in ids], object) if strings else None
    perm = np.random.default_rng(seed).permutation(len(ids))  # the stream's row order
    ids, codes, cand, err = ids[perm], codes[perm], cand[perm], err[perm]
    names = None if names is None else names[perm]

    spool = CandidateSpool(len(ids), n_levels, 3, strings, task_rows)
    blocks = result_blocks(ids, codes, cand, err, n_blocks, names)
    kept = [spool.take(b) for b in blocks]
    for b, k in zip(blocks, kept, strict=True):
        assert k.column_names == [c for c in b.column_names if c not in ("cand", "cand_err")]
        assert k.equals(b.drop_columns(["cand", "cand_err"]))
    order = np.argsort(names.astype(str) if strings else ids, kind="stable")  # ItemID order
    got_codes, got_dedup, counts = spool.relocate(codes[order].astype(np.uint16), order)

    ref = relocate(np.arange(len(ids)) if strings else ids[order], codes[order], cand[order], err[order])
    assert ref.moved_N.sum() > 50 and ref.suffix_N.sum() > 50  # both outcomes occur
    np.testing.assert_array_equal(got_codes, ref.codes_NL)
    np.testing.assert_array_equal(got_dedup, ref.dedup_N)
    assert counts["moved"] == ref.moved_N.sum() and counts["suffix_items"] == ref.suffix_N.sum()
    assert counts["err_delta"] == pytest.approx(ref.err_delta, rel=1e-9)
    assert counts["tasks"] == len(np.unique(prefix_buckets(codes, spool.n_buckets)))
    assert (counts["tasks"] > 1) == (task_rows < 1000 and n_levels > 1)


def test_buckets_hold_whole_prefixes_and_spread_them():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (20_000, 3)).astype(np.uint16)
    b = prefix_buckets(codes, 8)
    prefix = codes[:, 0].astype(np.int64) * 256 + codes[:, 1]
    for p in np.unique(prefix)[:200]:
        assert len(np.unique(b[prefix == p])) == 1
    counts = np.bincount(b, minlength=8)
    assert counts.min() > 0.8 * counts.mean()  # spread about evenly
    np.testing.assert_array_equal(b, prefix_buckets(codes[:, [0, 1, 2]].copy(), 8))
    assert not prefix_buckets(codes, 1).any()
