"""The S3 retry budget (--s3_retry_budget_s): one outage clock, one retry policy, for both S3
clients the run uses.

botocore and pyarrow's S3 client retry a fixed number of times, a few seconds in all: an S3
endpoint that restarts (a MinIO/SeaweedFS rollout, a network blip) would fail a long run. Here a
request that fails for a transient reason (``is_transient``) is retried with exponential backoff
(``Backoff``: 0.5 s doubling to 8 s) until S3 has been failing for the budget by an
``OutageClock``, then the run stops with a one-line error naming the file or bucket and the
budget.

An ``OutageClock`` starts at the first failed request of an outage and stops at the next request
that succeeds, so every request retried during one outage shares the same budget, and a run
gives up within the budget of the outage's start whatever it was doing. There is one class and
one semantics; what differs is who shares an instance:

- ``PROCESS_CLOCK``: the s3fs requests of one process (io/s3client.py) - the driver's listing,
  staging and publishing, or a Ray Train worker's. An outage past the budget raises
  ``S3Unavailable``.
- ``run_clock()``: the Ray Data read tasks of the catalog passes (catalog/source.py) on every
  node, through a small Ray actor on the driver's node; each task on its own would spend a whole
  budget, and tasks that start after others gave up would spend another. A task reads it through
  a ``TaskClock``, which falls back to a clock of the task's own if the actor is gone. A read
  past the budget ends the task's output with an error block naming the file.

Ray Train's checkpoints use pyarrow's own retries, as many as fit in the budget
(io/storage.py, ``Storage.arrow_fs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from semid_dist.errors import one_line

DEFAULT_RETRY_BUDGET_S = 120.0  # Config.s3_retry_budget_s
SDK_RETRY_S = 0.5  # pyarrow's own retries in a read task: catalog/source.read_unit retries past them
FIRST_WAIT_S, MAX_WAIT_S = 0.5, 8.0

# pyarrow's messages for S3 failures worth retrying (no connection, 5xx, slow-down)
_ARROW_TRANSIENT = (
    "NETWORK_CONNECTION",
    "HTTP status 5",
    "SLOW_DOWN",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
)
_TRANSIENT_NAMES = ("FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError")

_fail_fast = False  # inside fail_fast(): no retries (clean-up after the run has already failed)


class S3Unavailable(OSError):
    """S3 kept failing for the whole retry budget."""


class OutageClock:
    """How long S3 has been failing: started by the first failed request of an outage, stopped by
    the next request that succeeds (see the module docstring for who shares one)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failing(self) -> float:
        """A request failed: seconds since the outage began (0 for its first failure)."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since

    def ok(self) -> float | None:
        """A request succeeded: the outage, if any, is over; returns how long it lasted."""
        if self.since is None:
            return None
        lasted, self.since = time.monotonic() - self.since, None
        return lasted


PROCESS_CLOCK = OutageClock()  # this process's s3fs requests (io/s3client.py)


class Backoff:
    """The waits between one request's tries: 0.5 s doubling to 8 s, never past what is left of
    the budget."""

    def __init__(self) -> None:
        self.wait = FIRST_WAIT_S

    def next(self, left: float) -> float:
        out, self.wait = min(self.wait, left), min(2 * self.wait, MAX_WAIT_S)
        return out


@contextlib.contextmanager
def fail_fast():
    """s3fs requests in this block are tried once: for clean-up after a failure, which must not
    spend another retry budget."""
    global _fail_fast
    before, _fail_fast = _fail_fast, True
    try:
        yield
    finally:
        _fail_fast = before


def failing_fast() -> bool:
    return _fail_fast


def sdk_retries(budget_s: float) -> int:
    """pyarrow's S3 client retries by count, not by clock: the AWS SDK's default strategy waits
    25 ms x 2^n before retry n, so as many retries as fit in budget_s (12 for 120 s: 102 s of
    waits, the last one 51 s)."""
    return max(1, int(math.log2(budget_s / 0.025 + 2)))


def is_transient(e: BaseException | None) -> bool:
    """An S3 failure worth retrying: no connection, a timeout, a dropped connection, a 5xx or a
    slow-down, from botocore/s3fs (by type, also when s3fs wrapped it) or pyarrow (by message).
    Access, missing objects and bad requests are not."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    seen: list[BaseException] = []
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, asyncio.TimeoutError)):
            return True
        if isinstance(e, ClientError):
            meta = e.response.get("ResponseMetadata", {})
            code = e.response.get("Error", {}).get("Code", "")
            return meta.get("HTTPStatusCode", 0) >= 500 or code in ("SlowDown", "RequestTimeout")
        if type(e).__name__ in _TRANSIENT_NAMES or any(m in one_line(e) for m in _ARROW_TRANSIENT):
            return True
        e = e.__cause__ or e.__context__
    return False


_run_clock: tuple = (None, None)  # (Ray job id, the actor's handle)


def run_clock():
    """The run's shared OutageClock, a Ray actor on this (the driver's) node: one per driver
    process and Ray job, made on first use. Read tasks use it through a TaskClock."""
    global _run_clock
    import ray

    ctx = ray.get_runtime_context()
    if _run_clock[0] != ctx.get_job_id():
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=True)
        _run_clock = (
            ctx.get_job_id(),
            ray.remote(OutageClock).options(num_cpus=0, scheduling_strategy=here).remote(),
        )
    return _run_clock[1]


class TaskClock:
    """The run's clock (run_clock()) as one Ray task sees it, with the OutageClock interface:
    the actor's answer, or this task's own clock when the actor cannot be reached."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.own = OutageClock()

    def failing(self) -> float:
        own = self.own.failing()
        try:
            import ray

            return ray.get(self.handle.failing.remote(), timeout=10)
        except Exception:  # the clock is gone: this task's own
            return own

    def ok(self) -> float | None:
        lasted = self.own.ok()
        if lasted is not None:  # this task saw the outage: end it for the run
            try:
                self.handle.ok.remote()
            except Exception:  # the clock is gone: nothing to reset
                pass
        return lasted
