"""s3fs with the run's retry budget: what ``Storage.fs`` returns for ``s3://`` paths.

Its own module so that importing io/storage.py or io/retry.py (as every Ray Data read task
does) does not import s3fs and botocore.
"""

from __future__ import annotations

import asyncio
import logging

import s3fs

from semid_dist.errors import one_line
from semid_dist.io.retry import (
    DEFAULT_RETRY_BUDGET_S,
    PROCESS_CLOCK,
    Backoff,
    S3Unavailable,
    failing_fast,
    is_transient,
)

log = logging.getLogger("semid_dist")


class BudgetedS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose requests (all go through _call_s3, listings included) are retried with
    exponential backoff while this process's outage clock (retry.PROCESS_CLOCK) is younger than
    retry_budget_s; then S3Unavailable, whose message names the object and the budget."""

    def __init__(self, *args, retry_budget_s: float = DEFAULT_RETRY_BUDGET_S, **kwargs):
        self.retry_budget_s = float(retry_budget_s)
        super().__init__(*args, **kwargs)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        backoff = Backoff()
        while True:
            try:
                out = await super()._call_s3(method, *akwarglist, **kwargs)
            except Exception as e:
                if not is_transient(e):
                    raise
                first = PROCESS_CLOCK.since is None
                failing_s = PROCESS_CLOCK.failing()
                if first and not failing_fast():
                    log.warning(
                        "S3 request failed (%s); retrying for up to %g s (--s3_retry_budget_s)",
                        one_line(e),
                        self.retry_budget_s,
                    )
                left = self.retry_budget_s - failing_s
                if left <= 0 or failing_fast():
                    what = f"s3://{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}".rstrip("/")
                    raise S3Unavailable(
                        f"{what}: S3 unreachable, gave up after {failing_s:.0f} s of retries "
                        f"(--s3_retry_budget_s {self.retry_budget_s:g}): {one_line(e)}"
                    ) from e
                await asyncio.sleep(backoff.next(left))
                continue
            lasted = PROCESS_CLOCK.ok()
            if lasted is not None:
                log.info("S3 answers again after %.0f s", lasted)
            return out


# One instance cache with s3fs's own (fsspec keeps one per class): callers that change the
# credentials call s3fs.S3FileSystem.clear_instance_cache(), which must clear ours too.
BudgetedS3FileSystem._cache = s3fs.S3FileSystem._cache


def _orphaned_task_handler(loop, context: dict) -> None:
    exc = context.get("exception")
    if exc is not None and context.get("message") == "Task exception was never retrieved":
        log.debug("S3 client: an I/O task's error was not retrieved (%s: %s)", type(exc).__name__, exc)
        return
    loop.default_exception_handler(context)


def quiet_orphaned_task_errors(loop) -> None:
    """When a connection drops mid-upload, aiohttp's body-writer task fails next to the request
    that awaits it. The request's error reaches the caller (and becomes the run's one-line
    error), but the writer task's copy is never retrieved, so asyncio's default handler prints
    "Task exception was never retrieved" and a traceback on stderr when the task is collected.
    On fsspec's I/O loop those go to the debug log; anything else keeps the default handling."""
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_orphaned_task_handler)
