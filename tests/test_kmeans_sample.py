"""The sample the scan pass keeps for the fit: its size (modes.sample_target), the floor that
keeps it from coming out smaller than a codebook, the memory cap, and no sample for tiger."""

import glob
import json
import os

import numpy as np
import pytest
from test_cli_kmeans import run_cli

from conftest import make_catalog, write_parquet
from semid_dist import modes
from semid_dist.catalog.schema import inspect_catalog
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.io.storage import Storage
from semid_dist.math import sampling
from semid_dist.pipeline.fit import scan_stage
from semid_dist.run import Run


def cfg(**kw) -> Config:
    return Config(**{"data_path": "x", "output_dir": "y", "mode": "kmeans", **kw})


def test_sample_target_per_centroid_floor_and_cap():
    assert modes.sample_target(cfg(n_clusters=256), 768) == 256 * 256
    assert modes.sample_target(cfg(mode="tiger", n_embed=256), 768) == 0  # tiger trains on every item
    # --sample_per_centroid 1 aims above the codebook size, not at it
    assert (
        modes.sample_target(cfg(n_clusters=256, sample_per_centroid=1), 768)
        == sampling.sample_floor(256)
        > 256
    )
    # 256 x 8,192 rows of 768 floats would be 6.4 GB: cut to what 1 GB holds
    assert modes.sample_target(cfg(n_clusters=8192), 768) == int(1e9 // (4 * 768))
    assert modes.sample_target(cfg(n_clusters=8192, kmeans_sample_gb=8), 768) == 256 * 8192
    with pytest.raises(UserError, match="--kmeans_sample_gb 0.001 holds 325 rows of 768 floats"):
        modes.sample_target(cfg(n_clusters=512, kmeans_sample_gb=0.001), 768)
    with pytest.raises(UserError, match="kmeans_sample_gb"):
        cfg(kmeans_sample_gb=0).validated()


@pytest.mark.parametrize("k", [1, 16, 256])
def test_hash_sample_at_the_floor_holds_a_codebook(k):
    """Over 300 seeds the hash sample aimed at sample_floor(k) never keeps fewer than k rows
    (nor more than the room made for it), where one aimed at k itself falls short about half
    of the time."""
    ids = np.random.default_rng(k).permutation(10**7)[:20000].astype(np.int64)
    floor = sampling.sample_floor(k)
    kept_floor = [(sampling.hash_unit(ids, s) < floor / len(ids)).sum() for s in range(300)]
    kept_k = [(sampling.hash_unit(ids, s) < k / len(ids)).sum() for s in range(300)]
    assert min(kept_floor) >= k
    assert max(kept_floor) <= sampling.capacity(floor)  # the collecting array never has to grow
    assert 0.25 < np.mean(np.array(kept_k) < k) < 0.75


def _results(out):
    return json.load(open(os.path.join(out, "training_results.json")))


def test_sample_per_centroid_1_fits_where_the_sample_used_to_come_out_short(
    ray_session, small_catalog, tmp_path
):
    data, ids, _ = small_catalog
    # a seed for which a sample aimed at exactly 16 rows keeps fewer (the fit could not start)
    seed = next(s for s in range(100) if (sampling.hash_unit(ids, s) < 16 / len(ids)).sum() < 16)
    out = str(tmp_path / "out")
    assert run_cli(data, out, "--sample_per_centroid", "1", "--seed", str(seed)) == 0
    assert _results(out)["training"]["sample_size"] >= 16


def test_a_short_sample_is_a_one_line_error(ray_session, tmp_path, capsys):
    """A catalog whose ItemIDs hash almost all outside the sample: 10 sampled rows for 16 codes."""
    fraction = sampling.sample_floor(16) / 600
    pool = np.arange(1, 20000, dtype=np.int64)
    inside = sampling.hash_unit(pool, 42) < fraction
    ids = np.concatenate([pool[inside][:10], pool[~inside][:590]])
    _, x = make_catalog(600, 32, seed=2)
    data = str(tmp_path / "short.parquet")
    write_parquet(data, ids, x)
    out = str(tmp_path / "out")
    assert run_cli(data, out, "--sample_per_centroid", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "the k-means sample kept 10 rows, fewer than --n_clusters 16: raise --sample_per_centroid"
    )
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))


def test_kmeans_sample_gb_cuts_the_sample(ray_session, small_catalog, tmp_path):
    data, ids, _ = small_catalog  # 600 x 32-d: 128 bytes a row
    out = str(tmp_path / "out")
    gb = 200 * 128 / 1e9
    # asks for 256 x 16 rows; the sample fit alone (auto would then refine on every item)
    assert run_cli(data, out, "--kmeans_sample_gb", repr(gb), "--kmeans_fit", "sample") == 0
    kept = _results(out)["training"]["sample_size"]
    expected = int((sampling.hash_unit(ids, 42) < 200 / len(ids)).sum())
    assert kept == expected and kept < len(ids)
    [log] = glob.glob(os.path.join(out, "logs", "*.log"))
    assert "kmeans: sample cut to 200 rows (12 per centroid instead of 256)" in open(log).read()
    auto = str(tmp_path / "auto")
    assert run_cli(data, auto, "--kmeans_sample_gb", repr(gb)) == 0
    assert _results(auto)["training"]["fit"] == "stream"
    assert _results(auto)["training"]["sample_size"] == expected  # the cut sample is the warm start
    [log] = glob.glob(os.path.join(auto, "logs", "*.log"))
    assert "kmeans: streamed fit: a warm start on a sample of about 200 rows" in open(log).read()


def test_tiger_scan_keeps_no_sample(ray_session, small_catalog):
    data, ids, _ = small_catalog
    info = inspect_catalog(sorted(glob.glob(os.path.join(data, "*.parquet"))), Storage())
    c = cfg(mode="tiger", data_path=data, n_embed=16)
    scan = scan_stage(Run(c), info, len(ids))
    assert scan.sample_SD.shape == (0, 32) and sorted(scan.ids_N.tolist()) == sorted(ids.tolist())
    kmeans = scan_stage(Run(cfg(data_path=data, n_clusters=16)), info, len(ids))
    assert kmeans.sample_SD.shape[0] == len(ids)  # 256 x 16 rows asked of 600: all of them
