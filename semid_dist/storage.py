"""Paths on local disk or S3 (fsspec), input discovery, and publish-when-complete outputs.

Credentials are never taken from the config: s3fs and pyarrow read the standard AWS
environment/config (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...). Only the endpoint may be
overridden (--s3_endpoint_url, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). Nothing here puts
a credential into a path, a message, a pickled filesystem or a result: filesystems are built
without keys and resolve them from the environment in whichever process uses them.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import fsspec

from semid_dist.errors import UserError

SEED_FILE = "item_emb.parquet"  # the seed's layout: <data_path>/item_emb.parquet
SUCCESS = "_SUCCESS"
STARTED = "_STARTED"  # first object of a staging prefix: proves the destination is writable

log = logging.getLogger("semid_dist")


def is_s3(path: str) -> bool:
    return path.startswith(("s3://", "s3a://"))


def s3_endpoint(override: str = "") -> str | None:
    return override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(path: str, endpoint_url: str = "") -> fsspec.AbstractFileSystem:
    if is_s3(path):
        import s3fs

        kw = {}
        ep = s3_endpoint(endpoint_url)
        if ep:
            kw["endpoint_url"] = ep
        fs = s3fs.S3FileSystem(client_kwargs=kw, config_kwargs={"retries": {"max_attempts": 3}})
        _quiet_orphaned_task_errors(fs.loop)
        return fs
    return fsspec.filesystem("file")


def _orphaned_task_handler(loop, context: dict) -> None:
    exc = context.get("exception")
    if exc is not None and context.get("message") == "Task exception was never retrieved":
        log.debug("S3 client: an I/O task's error was not retrieved (%s: %s)", type(exc).__name__, exc)
        return
    loop.default_exception_handler(context)


def _quiet_orphaned_task_errors(loop) -> None:
    """When a connection drops mid-upload, aiohttp's body-writer task fails next to the request
    that awaits it. The request's error reaches the caller (and becomes the run's one-line
    error), but the writer task's copy is never retrieved, so asyncio's default handler prints
    "Task exception was never retrieved" and a traceback on stderr when the task is collected.
    On fsspec's I/O loop those go to the debug log; anything else keeps the default handling."""
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_orphaned_task_handler)


def strip_scheme(path: str) -> str:
    for prefix in ("s3://", "s3a://", "file://"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def bucket_of(path: str) -> str:
    return strip_scheme(path).split("/", 1)[0]


def arrow_filesystem(path: str, endpoint_url: str = ""):
    """A pyarrow filesystem for reading (pyarrow's native S3 client is faster than fsspec's).

    pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL (only FileSystem.from_uri reads it), so
    the endpoint is passed explicitly, with its scheme (http for MinIO/SeaweedFS). Without an
    endpoint (real AWS) and without a configured region, the bucket's region is looked up:
    pyarrow does not follow S3's cross-region redirects the way botocore does.
    """
    if not is_s3(path):
        return None
    from pyarrow import fs as pafs

    ep = s3_endpoint(endpoint_url)
    kw = {}
    if ep:
        u = urlparse(ep if "://" in ep else f"https://{ep}")
        kw = {"endpoint_override": u.netloc, "scheme": u.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not ep:
        try:
            region = pafs.resolve_s3_region(bucket_of(path))
        except Exception:  # no network / no permission: leave it to the SDK's default
            region = None
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def describe_s3_error(path: str, e: BaseException) -> UserError:
    """One line for an S3 failure (botocore/s3fs/pyarrow messages carry no credentials)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, PermissionError) or any(
        code in text
        for code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "Forbidden",
            "ACCESS_DENIED",
            "InvalidToken",
            "ExpiredToken",
        )
    ):
        return UserError(f"{path}: access denied by S3 (check the AWS credentials/profile): {text}")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return UserError(f"{path}: S3 bucket '{bucket_of(path)}' does not exist")
    if "NoCredentialsError" in type(e).__name__ or "Unable to locate credentials" in text:
        return UserError(
            f"{path}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        )
    return UserError(f"{path}: S3 request failed: {text}")


def _check_bucket(fs, path: str) -> None:
    """A missing bucket is its own error: s3fs reports only 'path does not exist', and
    makedirs() would silently CREATE the bucket when the credentials allow it."""
    bucket = bucket_of(path)
    if not bucket:
        raise UserError(f"{path}: no bucket in the S3 path")
    try:  # not fs.exists(bucket): s3fs answers False to every error, wrong keys included
        fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except FileNotFoundError as e:
        raise UserError(f"{path}: S3 bucket '{bucket}' does not exist") from e
    except Exception as e:
        raise describe_s3_error(path, e) from e


def list_parquet_inputs(data_path: str, endpoint_url: str = "") -> list[str]:
    """Resolve --data_path to a sorted list of parquet files (with scheme for S3).

    Accepts: the seed's directory holding item_emb.parquet, a single parquet file, a directory
    of shards (``part-*.parquet`` or any ``*.parquet`` below it), or a glob.
    """
    fs = filesystem(data_path, endpoint_url)
    raw = strip_scheme(data_path)
    scheme = "s3://" if is_s3(data_path) else ""
    try:
        if any(ch in raw for ch in "*?["):
            found = [p for p in fs.glob(raw) if p.endswith(".parquet")]
            if not found:
                raise UserError(f"{data_path}: glob matches no parquet files")
        elif not fs.exists(raw):
            if is_s3(data_path):
                _check_bucket(fs, data_path)
            raise UserError(f"{data_path}: path does not exist")
        elif fs.isfile(raw):
            found = [raw]
        elif fs.exists(join(raw, SEED_FILE)):
            found = [join(raw, SEED_FILE)]
        else:
            found = [
                p
                for p in fs.find(raw)
                if p.endswith(".parquet")
                and not any(part.startswith((".", "_")) for part in p[len(raw) :].split("/"))
            ]
            if not found:
                raise UserError(f"{data_path}: no {SEED_FILE} and no *.parquet files in directory")
    except UserError:
        raise
    except Exception as e:  # botocore / s3fs errors: credentials, bucket, network
        if is_s3(data_path):
            raise describe_s3_error(data_path, e) from e
        raise UserError(f"{data_path}: cannot list input: {e}") from e
    return sorted(scheme + p for p in found)


@dataclass
class Publisher:
    """Stage every output file under a hidden prefix; publish them only when all are written.

    A failed run calls abort(): the staging prefix is deleted and whatever an earlier run
    published stays untouched. publish() first removes the old _SUCCESS marker, moves files
    into place (os.replace locally: atomic per file; on S3 a server-side copy per object, as
    S3 has no rename), then writes _SUCCESS last, listing the files and the run id. A reader
    that checks _SUCCESS never sees a half-written result. Until publish() starts, the
    destination is not touched at all; if S3 fails during the copies, _SUCCESS is missing
    (the result reads as incomplete) and the staged copy remains under .staging-<run id>.
    """

    output_dir: str
    endpoint_url: str = ""

    def __post_init__(self) -> None:
        self.s3 = is_s3(self.output_dir)
        self.fs = filesystem(self.output_dir, self.endpoint_url)
        self.run_id = time.strftime("%Y%m%d_%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.root = strip_scheme(self.output_dir).rstrip("/")
        self.staging = join(self.root, f".staging-{self.run_id}")
        self.files: list[str] = []
        try:
            if self.s3:
                _check_bucket(self.fs, self.output_dir)
            else:
                self.fs.makedirs(self.staging, exist_ok=True)
            # Written first, before any compute: a read-only destination fails in seconds,
            # not after the training run.
            with self.fs.open(join(self.staging, STARTED), "w") as f:
                f.write(json.dumps({"run_id": self.run_id}) + "\n")
        except UserError:
            raise
        except Exception as e:
            if self.s3:
                raise describe_s3_error(self.output_dir, e) from e
            raise UserError(f"{self.output_dir}: cannot create output directory: {e}") from e

    def path(self, name: str) -> str:
        """Staging path (no scheme) for an output file; local parent folders are created
        (S3 has no folders: a key's prefix exists once an object is written under it)."""
        full = join(self.staging, name)
        if not self.s3:
            self.fs.makedirs(full.rsplit("/", 1)[0], exist_ok=True)
        if name not in self.files:
            self.files.append(name)
        return full

    def open(self, name: str, mode: str = "wb"):
        f = self.fs.open(self.path(name), mode)
        return _S3File(f, self.output_dir) if self.s3 else f

    def write_text(self, name: str, text: str) -> None:
        with self.open(name, "w") as f:
            f.write(text)

    def put_file(self, local_path: str, name: str) -> None:
        try:
            self.fs.put_file(local_path, self.path(name))
        except Exception as e:
            if self.s3:
                raise describe_s3_error(self.output_dir, e) from e
            raise

    def publish(self, extra: dict | None = None) -> None:
        try:
            self._publish(extra)
        except UserError:
            raise
        except Exception as e:
            if self.s3:
                raise describe_s3_error(self.output_dir, e) from e
            raise

    def _publish(self, extra: dict | None) -> None:
        marker = join(self.root, SUCCESS)
        self.fs.invalidate_cache()  # another writer may have changed the destination
        if self.fs.exists(marker):
            self.fs.rm(marker)
        for name in self.files:
            src, dst = join(self.staging, name), join(self.root, name)
            if self.s3:
                self.fs.copy(src, dst)  # the staged object is removed with the prefix below
            else:
                self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                os.replace(src, dst)
        manifest = {
            "run_id": self.run_id,
            "files": sorted(self.files),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        with self.fs.open(marker, "w") as f:
            f.write(json.dumps(manifest, indent=2))
        self._remove_staging()

    def abort(self) -> None:
        self._remove_staging()

    def _remove_staging(self) -> None:
        try:
            self.fs.invalidate_cache()
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        except Exception as e:  # best effort: the staging prefix is hidden and run-specific
            where = ("s3://" if self.s3 else "") + self.staging
            log.warning(
                "could not remove the staging area %s (%s); it is hidden from readers and can be deleted",
                where,
                str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
            )


class _S3File:
    """An S3 file being written, whose failures (the server went away, access revoked) surface
    as a one-line UserError naming the destination instead of a botocore traceback."""

    def __init__(self, f, where: str):
        self._f, self._where = f, where

    def write(self, data):
        try:
            return self._f.write(data)
        except Exception as e:
            raise describe_s3_error(self._where, e) from e

    def flush(self) -> None:
        try:
            self._f.flush()
        except Exception as e:
            raise describe_s3_error(self._where, e) from e

    def close(self) -> None:
        try:
            self._f.close()
        except Exception as e:
            raise describe_s3_error(self._where, e) from e

    def __getattr__(self, name: str):  # tell, closed, writable, ... as pyarrow's writers need
        return getattr(self._f, name)

    def __enter__(self) -> "_S3File":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: the staged object is discarded with the staging prefix
            self._f.close()
        except Exception:
            pass
