"""`ray job submit` on a two-node Ray cluster (tests/cluster.py), input and output on S3: tiger
with one train worker per node, kmeans, jobs.encode with an existing tokenizer, two nights of
jobs.nightly, tiger's intake check against the memory Ray gives a node, and jobs.evaluate."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from cluster import mapping, read_json
from conftest import KMEANS_ARGS, TIGER_ARGS, make_catalog, write_shards
from walks import write_walks

pytestmark = pytest.mark.slow


def test_job_api_needs_the_token(ray_cluster):
    assert ray_cluster.api("/api/jobs/")[0] == 200
    assert ray_cluster.api("/api/jobs/", token=None)[0] == 401
    assert ray_cluster.api("/api/jobs/", token="0" * 64)[0] == 403


def test_tiger_one_worker_per_node(ray_cluster, cluster_catalog, tiger_reference, s3):
    job, out, workers = tiger_reference
    nodes = {n.node_id for n in ray_cluster.nodes}
    assert len(workers) == 2, workers
    placed = {a["node_id"] for a in workers}
    assert len(placed) == 2 and placed <= nodes, (placed, nodes)  # two different nodes of ours
    log = job.logs()
    for epoch in range(1, 4):
        assert f"epoch {epoch}/3:" in log, log[-3000:]
    assert "resumed from checkpoint" not in log
    fs = s3.filesystem()
    ids = cluster_catalog[1]
    got = mapping(fs, out)
    assert sorted(got) == sorted(ids.tolist()) and len(set(got.values())) == len(got)
    results = read_json(fs, out + "training_results.json")
    assert results["mode"] == "tiger" and results["training"]["num_workers"] == 2
    assert results["training"]["run_dir"].startswith(out + ".ray_train/")  # checkpoints on S3
    assert "AWS" not in json.dumps(job.info.get("runtime_env", {}))  # credentials stay on the nodes
    print(f"tiger on 2 nodes: {job.seconds:.1f} s")


def test_kmeans_then_encode_with_its_tokenizer(ray_cluster, cluster_catalog, kmeans_reference, s3, tmp_path):
    from test_collision_policy import driver_relocation

    job, out = kmeans_reference
    fs = s3.filesystem()
    ids = cluster_catalog[1]
    ref = mapping(fs, out)
    assert sorted(ref) == sorted(ids.tolist()) and len(set(ref.values())) == len(ref)
    assert f"semid_dist kmeans: {len(ids)} items" in job.logs()  # the driver's summary, streamed back
    manifest = read_json(fs, out + "_SUCCESS")
    assert {"semantic_id_mappings.json", "semantic_id_mappings.parquet", "final_model.pt"} <= set(
        manifest["files"]
    )
    assert read_json(fs, out + "training_results.json")["input"]["files"] == 24
    for name in manifest["files"]:  # no credential in anything published
        assert s3.secret_key.encode() not in fs.cat_file(out.replace("s3://", "") + name), name
    # jobs.encode with that tokenizer under --collision_policy relocate, on S3 through the job
    # API, relocated in Ray tasks of about 100 items over both nodes: items alone on their codes
    # keep their IDs exactly; the others move only their last code, fewer keep a suffix, and
    # the quality report is published with the IDs
    enc_out = "s3://semid-test/cluster/encoded-relocate/"
    tok = out + "final_model.pt"
    enc_args = ["--data_path", cluster_catalog[0], "--output_dir", enc_out, "--tokenizer", tok]
    enc = ray_cluster.run(
        "jobs.encode", [*enc_args, "--collision_policy", "relocate", "--relocate_task_rows", "100"]
    )
    assert enc.ok, enc.logs()[-4000:]
    got = mapping(fs, enc_out)
    assert sorted(got) == sorted(ref) and len(set(got.values())) == len(got)
    tuples = Counter(v[:-1] for v in ref.values())
    alone = [i for i, v in ref.items() if tuples[v[:-1]] == 1]
    assert alone and all(got[i] == ref[i] for i in alone)
    assert all(got[i][0] == ref[i][0] for i in ref)
    c = read_json(fs, enc_out + "training_results.json")["metrics"]["collisions"]
    assert c["policy"] == "relocate" and c["moved"] > 0 and c["tasks"] > 1
    # the very IDs of relocate() over all items at once, in this process
    fs.get(tok.replace("s3://", ""), str(tmp_path / "final_model.pt"))
    ref_ids, ref_sid = driver_relocation(str(tmp_path), ids, cluster_catalog[2])
    assert got == {int(i): tuple(s) for i, s in zip(ref_ids.tolist(), ref_sid.tolist(), strict=True)}
    assert c["suffix_items"] == sum(v[-1] > 0 for v in got.values()) < sum(v[-1] > 0 for v in ref.values())
    assert "quality_report.html" in read_json(fs, enc_out + "_SUCCESS")["files"]
    print(f"kmeans {job.seconds:.1f} s, encode (relocate) {enc.seconds:.1f} s")


def test_nightly_two_nights(ray_cluster, cluster_catalog, s3, tmp_path):
    fs = s3.filesystem()
    uri, ids1, x1 = cluster_catalog
    # night 2: 100 items removed, 50 new, the rest unchanged
    new_ids, new_x = make_catalog(50, x1.shape[1], seed=22, first_id=10_000_000)
    ids2, x2 = np.r_[ids1[100:], new_ids], np.r_[x1[100:], new_x]
    write_shards(str(tmp_path / "night2"), ids2, x2, 3)
    fs.put(str(tmp_path / "night2") + "/", "semid-test/cluster/night2/", recursive=True)
    root = "s3://semid-test/cluster/nightly/"
    args = ["--output_dir", root, *KMEANS_ARGS]
    n1 = ray_cluster.run("jobs.nightly", ["--data_path", uri, "--generation", "night1", *args])
    assert n1.ok, n1.logs()[-4000:]
    assert read_json(fs, root + "LATEST")["generation"] == "night1"
    n2 = ray_cluster.run(
        "jobs.nightly", ["--data_path", "s3://semid-test/cluster/night2/", "--generation", "night2", *args]
    )
    assert n2.ok, n2.logs()[-4000:]
    latest = read_json(fs, root + "LATEST")
    assert latest["generation"] == "night2" and latest["parent"] == "night1"
    g1 = mapping(fs, root + "generations/night1/")
    g2 = mapping(fs, root + "generations/night2/")
    assert set(g2) == set(ids2.tolist())
    assert all(g2[i] == g1[i] for i in ids1[100:].tolist()), "unchanged items keep their IDs"
    assert len(set(g2.values())) == len(g2)
    print(f"nightly: night 1 {n1.seconds:.1f} s, night 2 {n2.seconds:.1f} s")


def test_tiger_intake_checks_the_nodes_memory(ray_cluster, s3, tmp_path):
    """A catalog whose per-worker shard exceeds what the worker node advertises stops before
    the intake, with one line saying what it needs; nothing is published."""
    fs = s3.filesystem()
    ids, x = make_catalog(16_000, 128, seed=23)  # 8,000 rows x 520 bytes = 4.2 MB per worker
    write_shards(str(tmp_path / "big"), ids, x, 2)
    fs.put(str(tmp_path / "big") + "/", "semid-test/cluster/big/", recursive=True)
    out = "s3://semid-test/cluster/too-big/"
    job = ray_cluster.run(
        "jobs.train", ["--data_path", "s3://semid-test/cluster/big/", "--output_dir", out, *TIGER_ARGS]
    )
    log = job.logs()
    assert not job.ok and job.exit_code == 2, (job.info, log[-3000:])
    errors = [ln for ln in log.splitlines() if ln.startswith("semid: error:")]
    assert len(errors) == 1, log[-3000:]
    assert "memory" in errors[0] and "--num_workers" in errors[0], errors[0]
    assert "rows in the workers' memory" not in log  # stopped before the intake
    fs.invalidate_cache()
    assert not fs.exists(out.replace("s3://", "") + "_SUCCESS")
    print(f"intake check: {errors[0]} ({job.seconds:.1f} s)")


def test_evaluate_on_two_nodes_from_s3(ray_cluster, cluster_catalog, kmeans_reference, s3, tmp_path):
    """jobs.evaluate through the job API: the run, the interactions and the outputs on S3 (the
    Ray Train checkpoints too), one train worker per node."""
    fs = s3.filesystem()
    uri, ids, x = cluster_catalog
    _, run = kmeans_reference
    write_walks(str(tmp_path / "walks.parquet"), ids, x, n_users=150, length=14, seed=5)
    fs.put(str(tmp_path / "walks.parquet"), "semid-test/cluster/walks/part-0.parquet")
    out = "s3://semid-test/cluster/evaluate/"
    args = ["--run", run, "--interactions", "s3://semid-test/cluster/walks/", "--output_dir", out]
    args += ["--num_workers", "2", "--cpus_per_worker", "2", "--epochs", "2", "--seeds", "1"]
    args += ["--protocols", "dense", "--baselines", "shuffled,popularity", "--bootstrap", "100"]
    job = ray_cluster.run("jobs.evaluate", args)
    assert job.ok, job.logs()[-4000:]
    workers = [a for a in ray_cluster.actors("RayTrainWorker") if a["job_id"] == job.info["job_id"]]
    assert len({a["node_id"] for a in workers}) == 2, workers
    e = read_json(fs, out + "evaluation.json")
    assert e["training"]["num_workers"] == 2 and e["training"]["run_dir"].startswith(out + ".ray_train/")
    fig = e["protocols"]["dense"]
    assert fig["targets"] == 150 * 10 and set(fig["variants"]) == {"run1", "shuffled1", "popularity"}
    assert {"evaluation.json", "evaluation.html"} <= set(read_json(fs, out + "_SUCCESS")["files"])
    assert "run1, dense, seed 42: epoch 2: loss" in job.logs()  # per-epoch progress, streamed back
    print(f"evaluate on 2 nodes: {job.seconds:.1f} s")
