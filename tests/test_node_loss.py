"""Losing a node of the two-node cluster (tests/cluster.py) in the middle of a job submitted with
`ray job submit`: SIGKILL to the worker node's whole process tree, then a fresh node joins.

- tiger with --max_failures 1: resumes from the last checkpoint (on S3), says so, logs every
  later epoch, and publishes exactly the IDs of the undisturbed run;
- tiger without --max_failures: one line names what was lost, a non-zero exit, and the result
  published earlier at that output is untouched;
- kmeans losing the node mid-encode: Ray retries the lost tasks; the IDs are those of the
  undisturbed run.

The loss happens at a known point: the SEMID_DIST_TEST_HOLD hook holds the workers after an
epoch's checkpoint, or the encode pass's tasks at their first block, until the node is gone.
"""

from __future__ import annotations

import re

import pytest

from cluster import Hold, mapping, read_json
from conftest import KMEANS_ARGS, TIGER_ARGS

pytestmark = pytest.mark.slow


def test_tiger_resumes_after_node_loss_with_the_same_ids(ray_cluster, cluster_catalog, tiger_reference, s3):
    ref_job, ref_out, _ = tiger_reference
    fs = s3.filesystem()
    hold = Hold("tiger_epoch_1", ray_cluster.base)
    out = "s3://semid-test/cluster/tiger-node-loss/"
    args = ["--data_path", cluster_catalog[0], "--output_dir", out, *TIGER_ARGS, "--max_failures", "1"]
    job = ray_cluster.submit("jobs.train", args, env_vars=hold.env)
    worker = ray_cluster.worker()
    hold.wait(job, worker.node_id)
    hold.wait_all(job, 2, settle=1.5)  # both ranks hold after epoch 1's checkpoint, taken by now
    _, noticed = ray_cluster.lose_worker()
    hold.release()
    job.wait()
    log = job.logs()
    assert job.ok, log[-4000:]
    resumed = re.findall(r"resumed from checkpoint after epoch (\d+)", log)
    assert resumed == ["1"], log[-4000:]
    after = log[log.index("resumed from checkpoint") :]
    for epoch in (2, 3):
        assert f"epoch {epoch}/3:" in after, after[-3000:]
    assert mapping(fs, out) == mapping(fs, ref_out), "a resumed run must publish the undisturbed run's IDs"
    # the same model too: the published metrics of the last epoch agree exactly
    got = read_json(fs, out + "training_results.json")["training"]["history"][-1]
    ref = read_json(fs, ref_out + "training_results.json")["training"]["history"][-1]
    assert got["loss"] == ref["loss"] and got["rel_recon"] == ref["rel_recon"], (got, ref)
    print(f"tiger node loss: noticed in {noticed:.1f} s, resumed after epoch 1, job {job.seconds:.1f} s")


def test_tiger_without_max_failures_names_the_loss(ray_cluster, cluster_catalog, tiger_reference, s3):
    """Into the output of the reference run: its published result must survive the failure."""
    _, out, _ = tiger_reference
    fs = s3.filesystem()
    before = read_json(fs, out + "_SUCCESS")
    ids_before = mapping(fs, out)
    hold = Hold("tiger_epoch_1", ray_cluster.base)
    job = ray_cluster.submit(
        "jobs.train", ["--data_path", cluster_catalog[0], "--output_dir", out, *TIGER_ARGS], env_vars=hold.env
    )
    hold.wait(job, ray_cluster.worker().node_id)
    hold.wait_all(job, 2)
    ray_cluster.lose_worker()
    hold.release()
    job.wait()
    log = job.logs()
    assert not job.ok and job.exit_code not in (None, 0), (job.info, log[-3000:])
    errors = [ln for ln in log.splitlines() if ln.startswith("semid: ")]
    assert len(errors) == 1, log[-3000:]
    assert "node" in errors[0] and "lost" in errors[0] and "--resume" in errors[0], errors[0]
    assert "Traceback" not in log[log.index("tiger: Ray Train") :]
    assert read_json(fs, out + "_SUCCESS") == before  # no _SUCCESS of the failed run
    assert mapping(fs, out) == ids_before
    print(f"tiger without --max_failures: {errors[0]!r} (exit {job.exit_code}, {job.seconds:.1f} s)")


def test_kmeans_node_loss_mid_encode_keeps_the_ids(ray_cluster, cluster_catalog, kmeans_reference, s3):
    _, ref_out = kmeans_reference
    fs = s3.filesystem()
    hold = Hold("encode_block", ray_cluster.base)
    out = "s3://semid-test/cluster/kmeans-node-loss/"
    job = ray_cluster.submit(
        "jobs.train",
        ["--data_path", cluster_catalog[0], "--output_dir", out, *KMEANS_ARGS],
        env_vars=hold.env,
    )
    lost = ray_cluster.worker().node_id
    held = hold.wait(job, lost)  # an encode task holds on the node about to be lost
    _, noticed = ray_cluster.lose_worker()
    hold.release()
    job.wait()
    assert job.ok, job.logs()[-4000:]
    assert mapping(fs, out) == mapping(fs, ref_out)
    print(
        f"kmeans node loss mid-encode ({len(held)} task(s) held there): "
        f"noticed in {noticed:.1f} s, job {job.seconds:.1f} s"
    )
