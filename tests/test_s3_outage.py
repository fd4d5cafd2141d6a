"""S3 going away under a job on the two-node cluster (tests/cluster.py): the SeaweedFS server is
killed mid-scan or mid-encode (the SEMID_DIST_TEST_HOLD hook holds the pass's tasks at their
first block; each task has a second file still to read) and restarted later on the same ports
with the same data.

- down for longer than --s3_retry_budget_s: one-line user error naming the file, exit 2, within
  the budget (plus the job's own teardown); once S3 is back, no _SUCCESS of that run, the earlier
  result at that output intact, and the staging prefix the run could not remove named in its log;
- back within the budget: the run finishes and publishes.
"""

from __future__ import annotations

import re
import time

import pytest

from cluster import Hold, mapping, read_json
from conftest import KMEANS_ARGS

pytestmark = pytest.mark.slow

BUDGET_S = 8.0
SLACK_S = 15.0  # the driver's teardown after the error: Ray Data shutdown, the job's exit


@pytest.fixture(scope="module")
def earlier(kmeans_reference, s3):
    """An earlier result at the outputs the outage runs write to (a copy of the kmeans run)."""
    fs = s3.filesystem()
    _, ref = kmeans_reference
    src = ref.replace("s3://", "").rstrip("/")
    outs = {}
    for name in ("scan", "encode"):
        dst = f"semid-test/cluster/outage-{name}"
        fs.copy(src + "/", dst + "/", recursive=True)
        outs[name] = f"s3://{dst}/"
    return outs


def _readable(fs, uri: str, timeout: float = 60) -> None:
    """Wait until S3 serves uri again: SeaweedFS answers 500 for a few seconds after a restart,
    while its volumes load."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fs.invalidate_cache()
            fs.cat_file(uri.replace("s3://", ""))
            return
        except OSError:
            assert time.monotonic() < deadline, f"{uri} still unreadable {timeout}s after the restart"
            time.sleep(0.5)


def _outage_run(ray_cluster, s3, catalog_uri: str, out: str, pass_name: str):
    """Kill S3 while the pass's tasks hold, let them go on; returns (job, seconds from the
    outage to the job's end)."""
    hold = Hold(pass_name, ray_cluster.base)
    args = [
        "--data_path",
        catalog_uri,
        "--output_dir",
        out,
        *KMEANS_ARGS,
        "--s3_retry_budget_s",
        str(BUDGET_S),
    ]
    job = ray_cluster.submit("jobs.train", args, env_vars=hold.env)
    hold.wait(job)
    s3.kill()
    t0 = time.monotonic()
    try:
        hold.release()
        job.wait(timeout=120)
        return job, time.monotonic() - t0
    finally:
        s3.restart()


@pytest.mark.parametrize("pass_name", ["scan_block", "encode_block"], ids=["mid-scan", "mid-encode"])
def test_outage_longer_than_the_budget(ray_cluster, cluster_catalog, earlier, s3, pass_name):
    out = earlier[pass_name.split("_")[0]]
    fs = s3.filesystem()
    before, ids_before = read_json(fs, out + "_SUCCESS"), mapping(fs, out)
    job, seconds = _outage_run(ray_cluster, s3, cluster_catalog[0], out, pass_name)
    _readable(fs, out + "_SUCCESS")
    log = job.logs()
    assert not job.ok and job.exit_code == 2, (job.info, log[-3000:])
    errors = [ln for ln in log.splitlines() if ln.startswith("semid: ")]
    assert len(errors) == 1 and errors[0].startswith("semid: error: "), log[-3000:]
    assert re.search(r"s3://semid-test/cluster/catalog/part-\d+\.parquet", errors[0]), errors[0]
    assert f"--s3_retry_budget_s {BUDGET_S:g}" in errors[0], errors[0]
    assert seconds < BUDGET_S + SLACK_S, f"{seconds:.1f} s to give up with a {BUDGET_S} s budget"
    staging = re.search(r"could not remove the staging area (s3://\S+)", log)
    assert staging and staging.group(1).startswith(out + ".staging-"), log[-3000:]
    fs.invalidate_cache()
    assert fs.exists(staging.group(1).replace("s3://", ""))  # left behind, hidden from readers
    assert read_json(fs, out + "_SUCCESS") == before and mapping(fs, out) == ids_before
    fs.rm(staging.group(1).replace("s3://", ""), recursive=True)
    print(f"S3 outage {pass_name}: error after {seconds:.1f} s (budget {BUDGET_S:g} s): {errors[0]}")


def test_outage_shorter_than_the_budget(ray_cluster, cluster_catalog, kmeans_reference, s3):
    _, ref = kmeans_reference
    hold = Hold("scan_block", ray_cluster.base)
    out = "s3://semid-test/cluster/outage-short/"
    args = ["--data_path", cluster_catalog[0], "--output_dir", out, *KMEANS_ARGS, "--s3_retry_budget_s", "30"]
    job = ray_cluster.submit("jobs.train", args, env_vars=hold.env)
    hold.wait(job)
    s3.kill()
    try:
        hold.release()
        time.sleep(3.0)  # the tasks' reads are failing and being retried now
    finally:
        down = 3.0 + s3.restart()
    job.wait(timeout=180)
    assert job.ok, job.logs()[-4000:]
    fs = s3.filesystem()
    assert mapping(fs, out) == mapping(fs, ref)
    print(f"S3 down {down:.1f} s mid-scan: the run finished ({job.seconds:.1f} s)")
