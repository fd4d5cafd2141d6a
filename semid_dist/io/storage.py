"""Paths on local disk or S3: one ``Storage`` object per run, with the S3 endpoint resolved once.

Credentials are never taken from the config: s3fs and pyarrow read the standard AWS
environment/config (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...). Only the endpoint may be
overridden (--s3_endpoint_url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). Nothing here puts
a credential into a path, a message, a pickled filesystem or a result: a ``Storage`` holds the
endpoint alone and its filesystems resolve keys from the environment in whichever process
uses them, so it can be shipped to Ray tasks as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec
from pyarrow import fs as pafs

from semid_dist.errors import UserError, one_line
from semid_dist.io.retry import DEFAULT_RETRY_BUDGET_S, S3Unavailable, sdk_retries

ORIGINAL_LAYOUT_FILE = "item_emb.parquet"  # the original tool's layout: <data_path>/item_emb.parquet


def is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def strip_scheme(path: str) -> str:
    for prefix in ("s3://", "s3a://", "file://"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def bucket_of(path: str) -> str:
    return strip_scheme(path).split("/", 1)[0]


@dataclass(frozen=True)
class Storage:
    """Where local paths and ``s3://`` URIs are read and written.

    ``endpoint_url`` is the S3 endpoint already resolved (``Storage.resolve``), or None for
    AWS itself."""

    endpoint_url: str | None = None
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S  # how long S3 errors are retried (see fs())

    @classmethod
    def resolve(cls, override: str = "", retry_budget_s: float = DEFAULT_RETRY_BUDGET_S) -> Storage:
        """--s3_endpoint_url when given, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
        ep = override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(ep or None, float(retry_budget_s))

    def fs(self, path: str) -> fsspec.AbstractFileSystem:
        """An fsspec filesystem for path (s3fs for S3 URIs, the local one otherwise). On S3, a
        request that fails for a transient reason (no connection, a timeout, a 5xx) is retried
        until S3 has been failing for retry_budget_s (io/retry.py, io/s3client.py)."""
        if not is_s3(path):
            return fsspec.filesystem("file")
        kw = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        # botocore does not retry: BudgetedS3FileSystem does, against the clock, not a count
        from semid_dist.io.s3client import BudgetedS3FileSystem, quiet_orphaned_task_errors

        fs = BudgetedS3FileSystem(
            client_kwargs=kw,
            config_kwargs={"retries": {"total_max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60},
            retry_budget_s=self.retry_budget_s,
        )
        quiet_orphaned_task_errors(fs.loop)
        return fs

    def arrow_fs(self, path: str, retry_budget_s: float | None = None):
        """A pyarrow filesystem for reading S3 (pyarrow's native client is faster than s3fs);
        None for local paths.

        pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL, so the endpoint is passed explicitly,
        with its scheme (http for MinIO/SeaweedFS). Without an endpoint (real AWS) and without a
        configured region, the bucket's region is looked up: pyarrow does not follow S3's
        cross-region redirects the way botocore does. Its client retries a failed request for
        about retry_budget_s (default: the run's budget)."""
        if not is_s3(path):
            return None
        kw = {}
        if self.endpoint_url:
            ep = self.endpoint_url
            u = urlparse(ep if "://" in ep else f"https://{ep}")
            kw = {"endpoint_override": u.netloc, "scheme": u.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not self.endpoint_url:
            try:
                region = pafs.resolve_s3_region(bucket_of(path))
            except Exception:  # no network / no permission: leave it to the SDK's default
                region = None
        if region:
            kw["region"] = region
        kw["retries"] = sdk_retries(self.retry_budget_s if retry_budget_s is None else retry_budget_s)
        return _ArrowS3(**kw)

    def read_bytes(self, uri: str, what: str = "file") -> bytes:
        """The whole object at uri; a missing one, a folder or a failed read is a UserError
        that names uri and `what` it should have been."""
        try:
            with self.fs(uri).open(strip_scheme(uri), "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise UserError(f"{uri}: {what} does not exist") from e
        except IsADirectoryError as e:
            raise UserError(f"{uri}: is a directory, not a {what}") from e
        except Exception as e:
            if is_s3(uri):
                raise describe_s3_error(uri, e) from e
            raise UserError(f"{uri}: cannot read {what}: {one_line(e)}") from e

    def check_bucket(self, path: str) -> None:
        """A missing bucket is its own error: s3fs reports only 'path does not exist', and
        makedirs() would silently CREATE the bucket when the credentials allow it."""
        bucket = bucket_of(path)
        if not bucket:
            raise UserError(f"{path}: no bucket in the S3 path")
        try:  # not fs.exists(bucket): s3fs answers False to every error, wrong keys included
            self.fs(path).call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except FileNotFoundError as e:
            raise UserError(f"{path}: S3 bucket '{bucket}' does not exist") from e
        except Exception as e:
            raise describe_s3_error(path, e) from e

    def list_parquet(self, data_path: str) -> list[str]:
        """Resolve --data_path to a sorted list of parquet files (with scheme for S3).

        Accepts: the original tool's directory holding item_emb.parquet, a single parquet file,
        a directory of shards (``part-*.parquet`` or any ``*.parquet`` below it, skipping hidden
        and ``_`` names), or a glob."""
        fs = self.fs(data_path)
        raw = strip_scheme(data_path)
        scheme = "s3://" if is_s3(data_path) else ""
        try:
            if any(ch in raw for ch in "*?["):
                found = [p for p in fs.glob(raw) if p.endswith(".parquet")]
                if not found:
                    raise UserError(f"{data_path}: glob matches no parquet files")
            elif not fs.exists(raw):
                if is_s3(data_path):
                    self.check_bucket(data_path)
                raise UserError(f"{data_path}: path does not exist")
            elif fs.isfile(raw):
                found = [raw]
            elif fs.exists(join(raw, ORIGINAL_LAYOUT_FILE)):
                found = [join(raw, ORIGINAL_LAYOUT_FILE)]
            else:
                found = [
                    p
                    for p in fs.find(raw)
                    if p.endswith(".parquet")
                    and not any(part.startswith((".", "_")) for part in p[len(raw) :].split("/"))
                ]
                if not found:
                    raise UserError(
                        f"{data_path}: no {ORIGINAL_LAYOUT_FILE} and no *.parquet files in directory"
                    )
        except UserError:
            raise
        except Exception as e:  # botocore / s3fs errors: credentials, bucket, network
            if is_s3(data_path):
                raise describe_s3_error(data_path, e) from e
            raise UserError(f"{data_path}: cannot list input: {e}") from e
        return sorted(scheme + p for p in found)


_ACCESS_DENIED = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "Forbidden",
    "ACCESS_DENIED",
    "InvalidToken",
    "ExpiredToken",
)


class _ArrowS3(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with a retry count, pickled as the arguments it was made with:
    pyarrow's own pickling drops the retry strategy (a Ray task would get the default 3
    attempts) and carries the credentials it resolved, which must stay in the environment of
    the process that uses them."""

    def __init__(self, retries: int = 3, **kw) -> None:
        self._args = {"retries": retries, **kw}
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries), **kw)

    def __reduce__(self):
        return _arrow_s3, (self._args,)


def _arrow_s3(args: dict) -> _ArrowS3:
    return _ArrowS3(**args)


def describe_s3_error(path: str, e: BaseException) -> UserError:
    """One line for an S3 failure (botocore/s3fs/pyarrow messages carry no credentials)."""
    text = one_line(e)
    if isinstance(e, S3Unavailable):  # the message names the object and the budget already
        return UserError(text)
    if isinstance(e, PermissionError) or any(code in text for code in _ACCESS_DENIED):
        return UserError(f"{path}: access denied by S3 (check the AWS credentials/profile): {text}")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return UserError(f"{path}: S3 bucket '{bucket_of(path)}' does not exist")
    if "NoCredentialsError" in type(e).__name__ or "Unable to locate credentials" in text:
        return UserError(
            f"{path}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    return UserError(f"{path}: S3 request failed: {text}")
