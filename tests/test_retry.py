"""The one S3 outage clock (semid_dist/io/retry.py) and its two users: s3fs requests in this
process, and the read tasks' pyarrow reads sharing the run's clock through a Ray actor. "S3 is
down" here is an endpoint on a port nothing listens on; the SeaweedFS tests (test_s3_outage.py,
test_s3_end_to_end.py) kill a real server."""

from __future__ import annotations

import socket
import time

import pyarrow as pa
import pytest

from semid_dist.catalog import source
from semid_dist.io import retry
from semid_dist.io.storage import Storage


@pytest.fixture
def down(monkeypatch) -> Storage:
    """Storage whose S3 endpoint refuses every connection (keys set so no SDK looks further)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield Storage(f"http://127.0.0.1:{port}", retry_budget_s=1.0)
    retry.PROCESS_CLOCK.ok()  # this process's outage ends with the test


def test_the_clock_measures_one_outage():
    clock = retry.OutageClock()
    assert clock.ok() is None  # no outage: nothing to end
    assert clock.failing() == 0.0  # the outage's first failure
    time.sleep(0.05)
    assert 0.05 <= clock.failing() < 1.0  # later failures: since the first one
    lasted = clock.ok()
    assert lasted is not None and lasted >= 0.05 and clock.since is None
    assert clock.failing() == 0.0  # the next outage starts afresh


def test_backoff_doubles_to_eight_seconds_within_the_budget():
    b = retry.Backoff()
    assert [b.next(100.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert retry.Backoff().next(0.2) == 0.2  # never past what is left
    assert retry.sdk_retries(120.0) == 12 and retry.sdk_retries(retry.SDK_RETRY_S) == 4


def test_what_is_transient():
    from botocore.exceptions import ClientError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    assert retry.is_transient(client_error(503, "ServiceUnavailable"))
    assert retry.is_transient(client_error(400, "SlowDown"))
    assert not retry.is_transient(client_error(403, "AccessDenied"))
    try:  # wrapped the way s3fs wraps botocore's errors
        try:
            raise client_error(500, "InternalError")
        except ClientError as e:
            raise OSError("[Errno 5] An error occurred") from e
    except OSError as e:
        assert retry.is_transient(e)
    assert retry.is_transient(OSError("AWS Error SLOW_DOWN during GetObject operation"))  # pyarrow's
    assert not retry.is_transient(FileNotFoundError("b/k"))
    assert not retry.is_transient(OSError("AWS Error ACCESS_DENIED during HeadObject operation"))


def test_s3fs_requests_spend_the_process_clock(down):
    fs = down.fs("s3://b/k.parquet")
    t0 = time.monotonic()
    with pytest.raises(retry.S3Unavailable) as info:
        fs.cat_file("b/k.parquet")
    assert time.monotonic() - t0 < 5
    assert str(info.value).startswith("s3://b/k.parquet: S3 unreachable, gave up after ")
    assert "(--s3_retry_budget_s 1)" in str(info.value)
    assert retry.PROCESS_CLOCK.since is not None  # the outage goes on for this process
    t0 = time.monotonic()  # a second request in the same outage: the budget is already spent
    with pytest.raises(retry.S3Unavailable):
        fs.cat_file("b/other.parquet")
    assert time.monotonic() - t0 < 0.5
    with retry.fail_fast():  # clean-up after a failure: one try, however young the outage
        retry.PROCESS_CLOCK.ok()
        t0 = time.monotonic()
        with pytest.raises(retry.S3Unavailable):
            fs.cat_file("b/k.parquet")
        assert time.monotonic() - t0 < 0.5


def test_read_tasks_share_the_runs_clock(ray_session):
    ray = ray_session
    handle = ray.remote(retry.OutageClock).options(num_cpus=0).remote()
    a, b = retry.TaskClock(handle), retry.TaskClock(handle)
    assert a.failing() < 0.5
    time.sleep(0.3)
    assert b.failing() >= 0.3  # b's first failure: the outage a saw began 0.3 s ago
    assert b.ok() is not None  # b reads again: the outage is over for the run
    assert a.failing() < 0.3  # a's next failure starts a new one
    ray.kill(handle)
    time.sleep(0.5)
    assert a.failing() >= 0.5  # the actor is gone: a's own clock, from a's first failure


def test_a_read_past_the_budget_names_file_and_budget(ray_session, down):
    piece = source.Piece("s3://b/part-0.parquet", None, 10)
    fs = down.arrow_fs(piece.path, retry_budget_s=retry.SDK_RETRY_S)
    clock = ray_session.remote(retry.OutageClock).options(num_cpus=0).remote()
    t0 = time.monotonic()
    (block,) = list(source.read_unit(source.Unit((piece,)), fs, retry_budget_s=1.0, clock=clock))
    took = time.monotonic() - t0
    why = block.column(source.ERROR_COL)[0].as_py()
    assert isinstance(block, pa.Table) and why.startswith("s3://b/part-0.parquet: cannot read parquet (")
    assert (
        "S3 unreachable for the retry budget, --s3_retry_budget_s 1: " in why and "NETWORK_CONNECTION" in why
    )
    assert 1.0 <= took < 10, took  # retried for the budget by the run's clock, then gave up
    assert ray_session.get(clock.failing.remote()) >= 1.0  # the run's clock saw it all
