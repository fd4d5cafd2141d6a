"""Nightly generations end to end (real Ray, real parquet, local dirs): stable IDs over nights
with additions, removals and changed embeddings; re-runs; crashes before LATEST moves."""

import json
import os
import runpy
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_catalog, write_shards
from semid_dist import lineage, load_tokenizer
from semid_dist.cli import main, parse_config
from semid_dist.commands import nightly
from semid_dist.io.publish import SUCCESS, Publisher
from semid_dist.io.storage import Storage

ARGS = ["--mode", "kmeans", "--n_layers", "2", "--n_clusters", "8", "--max_iters", "5", "--seed", "3"]
N1, D = 300, 16


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """Night 1: 300 items. Night 2: 20 removed, 10 changed (5 by one ulp, 5 replaced), 30 new.
    Night 3: night 2 + 5 of the removed items back unchanged + 10 new."""
    base = tmp_path_factory.mktemp("nightly_catalogs")
    ids1, x1 = make_catalog(N1, D, seed=5)
    rng = np.random.default_rng(11)
    perm = rng.permutation(N1)
    removed, nudged, replaced = perm[:20], perm[20:25], perm[25:30]
    x2 = x1.copy()
    x2[nudged, 0] = np.nextafter(x2[nudged, 0], np.float32(np.inf))  # a one-ulp change
    x2[replaced] = x1[rng.permutation(N1)[:5]][:, ::-1]  # an unrelated embedding
    keep = np.setdiff1d(np.arange(N1), removed)
    new_ids, new_x = make_catalog(30, D, seed=6, first_id=1_000_000)
    ids2, x2 = np.r_[ids1[keep], new_ids], np.r_[x2[keep], new_x]
    back = removed[:5]
    more_ids, more_x = make_catalog(10, D, seed=7, first_id=2_000_000)
    ids3, x3 = np.r_[ids2, ids1[back], more_ids], np.r_[x2, x1[back], more_x]
    out = {
        "ids1": ids1,
        "x1": x1,
        "ids2": ids2,
        "x2": x2,
        "ids3": ids3,
        "x3": x3,
        "removed": ids1[removed],
        "changed": ids1[perm[20:30]],
        "new": new_ids,
        "back": ids1[back],
        "more": more_ids,
    }
    for night, (ids, x) in {1: (ids1, x1), 2: (ids2, x2), 3: (ids3, x3)}.items():
        out[f"data{night}"] = str(base / f"night{night}")
        write_shards(out[f"data{night}"], ids, x, 2 + night % 2)
    return out


def argv(data, root, name, tmp_path, *extra):
    return [
        "nightly",
        "--data_path",
        data,
        "--output_dir",
        root,
        "--generation",
        name,
        "--log_dir",
        str(tmp_path / "logs"),
        *ARGS,
        *extra,
    ]


def run(data, root, name, tmp_path, *extra) -> dict:
    cfg, extra_args = parse_config(argv(data, root, name, tmp_path, *extra))
    return nightly.run(cfg, log_dir=extra_args["log_dir"])


def gen_dir(root, name):
    return os.path.join(root, "generations", name)


def mapping(root, name) -> dict:
    with open(os.path.join(gen_dir(root, name), "semantic_id_mappings.json")) as f:
        return {int(k): tuple(v) for k, v in json.load(f).items()}


def retired(root, name) -> dict:
    t = pq.read_table(os.path.join(gen_dir(root, name), lineage.RETIRED)).to_pydict()
    return {tuple(s): (i, str(r)) for s, i, r in zip(t["semantic_id"], t["ItemID"], t["reason"], strict=True)}


def latest(root) -> dict:
    with open(os.path.join(root, lineage.LATEST)) as f:
        return json.load(f)


def snapshot(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_two_nights_rerun_and_retrain(ray_session, catalogs, tmp_path, capsys):
    c, root = catalogs, str(tmp_path / "ids")

    # night 1: no LATEST -> trains, like a normal run, and writes generation #1
    assert main(argv(c["data1"], root, "2024-06-01", tmp_path)) == 0
    assert "collision rate before dedup" in capsys.readouterr().out
    assert latest(root)["generation"] == "2024-06-01" and latest(root)["seq"] == 1
    g1 = mapping(root, "2024-06-01")
    assert set(g1) == set(c["ids1"].tolist())
    train_out = str(tmp_path / "train")
    assert (
        main(
            [
                "train",
                "--data_path",
                c["data1"],
                "--output_dir",
                train_out,
                "--log_dir",
                str(tmp_path / "logs"),
                *ARGS,
            ]
        )
        == 0
    )
    with open(os.path.join(train_out, "semantic_id_mappings.json")) as f:
        assert {int(k): tuple(v) for k, v in json.load(f).items()} == g1
    assert retired(root, "2024-06-01") == {}

    # night 2: additions, removals, changed embeddings; the tokenizer is generation 1's copy
    r2 = run(c["data2"], root, "2024-06-02", tmp_path)
    g2 = mapping(root, "2024-06-02")
    changed, removed, new = set(c["changed"].tolist()), set(c["removed"].tolist()), set(c["new"].tolist())
    stable = set(c["ids2"].tolist()) - changed - new
    assert all(g2[i] == g1[i] for i in stable), "unchanged items must keep their ID exactly"
    tok = load_tokenizer(os.path.join(gen_dir(root, "2024-06-02"), "final_model.pt"))
    x_of = dict(zip(c["ids2"].tolist(), c["x2"], strict=True))
    kept = {i for i in changed if tuple(tok.encode(x_of[i][None])[0]) == g1[i][:2]}
    assert all(g2[i] == g1[i] for i in kept) and all(g2[i] != g1[i] for i in changed - kept)
    assert kept and changed - kept, "the catalog should exercise both outcomes of a change"
    fresh = {g2[i] for i in new | (changed - kept)}
    assert len(fresh) == len(new | (changed - kept)) and not fresh & set(g1.values())
    assert len(set(g2.values())) == len(g2)
    assert r2["counts"] == {
        "items": 310,
        "stable": 270,
        "new": 30,
        "changed": 10,
        "removed": 20,
        "changed_kept_id": len(kept),
        "reclaimed": 0,
        "fresh_ids": 40 - len(kept),
        "retired_tonight": 30 - len(kept),
        "retired_total": 30 - len(kept),
        "max_dedup_code": max(s[-1] for s in g2.values()),
    }
    assert retired(root, "2024-06-02") == {
        **{g1[i]: (i, "removed") for i in removed},
        **{g1[i]: (i, "changed") for i in changed - kept},
    }
    saved = json.load(open(os.path.join(gen_dir(root, "2024-06-02"), "training_results.json")))
    assert saved["counts"] == r2["counts"] and 0 <= saved["metrics"]["collision_rate"] < 1
    assert saved["generation"]["parent"] == "2024-06-01" and saved["generation"]["seq"] == 2
    assert (
        open(os.path.join(gen_dir(root, "2024-06-02"), "final_model.pt"), "rb").read()
        == open(os.path.join(gen_dir(root, "2024-06-01"), "final_model.pt"), "rb").read()
    )
    assert latest(root) == {
        "generation": "2024-06-02",
        "seq": 2,
        "parent": "2024-06-01",
        "content_digest": r2["generation"]["content_digest"],
        "path": "generations/2024-06-02",
    }
    assert r2["generation"]["latest"] == "moved"

    # re-running night 2 (same items, other row order and sharding) verifies and rewrites
    # nothing; other content under its name is refused
    before = snapshot(root)
    perm = np.random.default_rng(1).permutation(len(c["ids2"]))
    write_shards(str(tmp_path / "night2_reshuffled"), c["ids2"][perm], c["x2"][perm], 4)
    again = run(str(tmp_path / "night2_reshuffled"), root, "2024-06-02", tmp_path)
    assert again["generation"]["status"] == "verified" and again["counts"] == r2["counts"]
    assert again["generation"]["content_digest"] == r2["generation"]["content_digest"]
    assert snapshot(root) == before
    assert main(argv(c["data3"], root, "2024-06-02", tmp_path)) == 2
    assert "already published with other content" in capsys.readouterr().err
    assert snapshot(root) == before

    # night 3 through the ray-job entrypoint, with a retrained tokenizer: stable IDs still hold,
    # items back with their old embedding reclaim their old ID, fresh IDs avoid live and retired
    sys_argv = sys.argv
    sys.argv = [
        "jobs/nightly.py",
        *argv(c["data3"], root, "2024-06-03", tmp_path, "--retrain", "--seed", "9")[1:],
    ]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(
                os.path.join(os.path.dirname(__file__), "..", "jobs", "nightly.py"), run_name="__main__"
            )
    finally:
        sys.argv = sys_argv
    assert done.value.code == 0
    g3 = mapping(root, "2024-06-03")
    assert all(g3[i] == g2[i] for i in g2 if i in g3)
    back, more = c["back"].tolist(), set(c["more"].tolist())
    assert all(g3[i] == g1[i] for i in back)
    ever = set(g2.values()) | set(retired(root, "2024-06-02"))
    assert not {g3[i] for i in more} & ever and len(set(g3.values())) == len(g3)
    r3 = json.load(open(os.path.join(gen_dir(root, "2024-06-03"), "training_results.json")))
    assert r3["counts"]["stable"] == 310 and r3["counts"]["reclaimed"] == 5 and r3["counts"]["new"] == 15
    assert r3["generation"]["tokenizer_source"] == "trained"
    assert r3["generation"]["tokenizer_fingerprint"] != saved["generation"]["tokenizer_fingerprint"]
    assert set(retired(root, "2024-06-03")) == set(retired(root, "2024-06-02")) - {g1[i] for i in back}
    assert latest(root)["generation"] == "2024-06-03"


def test_crash_leaves_latest_on_previous_generation(ray_session, catalogs, tmp_path, monkeypatch, capsys):
    c, root = catalogs, str(tmp_path / "ids")
    assert main(argv(c["data1"], root, "n1", tmp_path)) == 0

    # bad input tonight: one-line error naming the file, nothing published, LATEST unchanged
    bad = tmp_path / "bad"
    ids, x = c["ids2"].copy(), c["x2"].copy()
    x[7, 3] = np.nan
    write_shards(str(bad), ids, x, 2)
    assert main(argv(str(bad), root, "n2", tmp_path)) == 2
    assert f"part-00000.parquet: ItemID {ids[7]}: embedding contains NaN" in capsys.readouterr().err
    assert latest(root)["generation"] == "n1" and lineage.Lineage(root, Storage()).manifest("n2") is None

    # crash after every file of n2 is staged, before it is published
    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(Publisher, "publish", crash)
        assert main(argv(c["data2"], root, "n2", tmp_path)) == 1
    assert "simulated crash" in capsys.readouterr().err
    assert latest(root)["generation"] == "n1"
    assert not os.path.exists(os.path.join(gen_dir(root, "n2"), SUCCESS))
    assert [f for _, _, fs in os.walk(gen_dir(root, "n2")) for f in fs] == []  # staging removed

    # crash after n2 is published, before LATEST moves: n2 is complete but not current
    with monkeypatch.context() as m:
        m.setattr(lineage.Lineage, "write_latest", crash)
        assert main(argv(c["data2"], root, "n2", tmp_path)) == 1
    assert latest(root)["generation"] == "n1"
    assert os.path.exists(os.path.join(gen_dir(root, "n2"), SUCCESS))
    published = snapshot(gen_dir(root, "n2"))

    # the re-run verifies n2 (identical content, nothing rewritten) and moves LATEST
    r = run(c["data2"], root, "n2", tmp_path)
    assert r["generation"]["status"] == "verified" and r["generation"]["latest"] == "moved"
    assert latest(root)["generation"] == "n2" and latest(root)["parent"] == "n1"
    assert snapshot(gen_dir(root, "n2")) == published
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temp LATEST left behind


def test_bad_nightly_flags(tmp_path, capsys):
    assert main(["nightly", "--data_path", "x", "--output_dir", str(tmp_path), "--generation", "../up"]) == 2
    assert "--generation" in capsys.readouterr().err
    assert main(["nightly", "--data_path", "x", "--output_dir", str(tmp_path), "--changed_policy", "no"]) == 2
    assert "--changed_policy" in capsys.readouterr().err
