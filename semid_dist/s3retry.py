"""The S3 retry budget (--s3_retry_budget_s) for everything the run reads and writes with s3fs.

botocore retries a fixed number of times, a few seconds in all: an S3 endpoint that restarts
(a MinIO/SeaweedFS rollout, a network blip) would fail a long run. Here every request that fails
for a transient reason is retried with exponential backoff until S3 has been failing for the
budget, then the run stops with S3Unavailable, which callers turn into a one-line UserError
naming the file or bucket. pyarrow's own S3 client (Ray Data's reads, Ray Train's checkpoints)
gets the same budget as a retry count (storage.Storage.arrow_fs).

One clock per process: it starts at the first failed request of an outage and stops at the next
request that succeeds, so every request retried during one outage shares the same budget, and
a run gives up within the budget of the outage's start whatever it was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import s3fs

from semid_dist.errors import one_line

log = logging.getLogger("semid_dist")

_outage_since: float | None = None
_fail_fast = False  # inside fail_fast(): no retries (clean-up after the run has already failed)


class S3Unavailable(OSError):
    """S3 kept failing for the whole retry budget."""


@contextlib.contextmanager
def fail_fast():
    """S3 requests in this block are tried once: for clean-up after a failure, which must not
    spend another retry budget."""
    global _fail_fast
    before, _fail_fast = _fail_fast, True
    try:
        yield
    finally:
        _fail_fast = before


def is_transient(e: BaseException | None) -> bool:
    """An S3 failure worth retrying: no connection, a timeout, a dropped connection, a 5xx or
    a slow-down (also when s3fs wrapped it). Access, missing objects and bad requests are not."""
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
        if type(e).__name__ in ("FSTimeoutError", "ClientPayloadError", "ServerDisconnectedError"):
            return True
        e = e.__cause__ or e.__context__
    return False


class BudgetedS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose requests (all go through _call_s3, listings included) are retried with
    exponential backoff (0.5 s doubling to 8 s) while the outage is younger than
    retry_budget_s; then S3Unavailable."""

    def __init__(self, *args, retry_budget_s: float = 120.0, **kwargs):
        self.retry_budget_s = float(retry_budget_s)
        super().__init__(*args, **kwargs)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        global _outage_since
        delay = 0.5
        while True:
            try:
                out = await super()._call_s3(method, *akwarglist, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                now = time.monotonic()
                if _outage_since is None:
                    _outage_since = now
                    if not _fail_fast:
                        log.warning(
                            "S3 request failed (%s); retrying for up to %g s (--s3_retry_budget_s)",
                            one_line(e),
                            self.retry_budget_s,
                        )
                left = _outage_since + self.retry_budget_s - now
                if left <= 0 or _fail_fast:
                    what = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}".rstrip("/")
                    raise S3Unavailable(
                        f"{what}: S3 unreachable, gave up after {now - _outage_since:.0f} s of retries "
                        f"(--s3_retry_budget_s {self.retry_budget_s:g}): {one_line(e)}"
                    ) from e
                await asyncio.sleep(min(delay, left))
                delay = min(2 * delay, 8.0)
                continue
            if _outage_since is not None:
                log.info("S3 answers again after %.0f s", time.monotonic() - _outage_since)
                _outage_since = None
            return out


# One instance cache with s3fs's own (fsspec keeps one per class): callers that change the
# credentials call s3fs.S3FileSystem.clear_instance_cache(), which must clear ours too.
BudgetedS3FileSystem._cache = s3fs.S3FileSystem._cache
