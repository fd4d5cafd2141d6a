"""Paths on local disk or S3 (fsspec), input discovery, and publish-when-complete outputs.

Credentials are never taken from the config: s3fs and pyarrow read the standard AWS
environment/config (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/...). Only the endpoint may be
overridden (--s3_endpoint_url, else AWS_ENDPOINT_URL).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import fsspec

from semid_dist.errors import UserError

SEED_FILE = "item_emb.parquet"  # the seed's layout: <data_path>/item_emb.parquet
SUCCESS = "_SUCCESS"


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
        return s3fs.S3FileSystem(client_kwargs=kw, config_kwargs={"retries": {"max_attempts": 3}})
    return fsspec.filesystem("file")


def strip_scheme(path: str) -> str:
    for prefix in ("s3://", "s3a://", "file://"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])


def arrow_filesystem(path: str, endpoint_url: str = ""):
    """A pyarrow filesystem for reading (pyarrow's native S3 client is faster than fsspec's)."""
    if not is_s3(path):
        return None
    from pyarrow import fs as pafs

    ep = s3_endpoint(endpoint_url)
    kw = {}
    if ep:
        scheme, _, host = ep.partition("://")
        kw = {"endpoint_override": host or ep, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def _describe_s3_error(path: str, e: Exception) -> UserError:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text or "Forbidden" in text:
        return UserError(f"{path}: access denied by S3 (check AWS credentials/profile): {text}")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return UserError(f"{path}: S3 bucket does not exist")
    return UserError(f"{path}: S3 request failed: {text}")


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
            raise UserError(f"{data_path}: path does not exist")
        elif fs.isfile(raw):
            found = [raw]
        elif fs.exists(join(raw, SEED_FILE)):
            found = [join(raw, SEED_FILE)]
        else:
            found = [p for p in fs.find(raw) if p.endswith(".parquet")
                     and not any(part.startswith((".", "_")) for part in p[len(raw):].split("/"))]
            if not found:
                raise UserError(f"{data_path}: no {SEED_FILE} and no *.parquet files in directory")
    except UserError:
        raise
    except Exception as e:  # botocore / s3fs errors: credentials, bucket, network
        if is_s3(data_path):
            raise _describe_s3_error(data_path, e) from e
        raise UserError(f"{data_path}: cannot list input: {e}") from e
    return sorted(scheme + p for p in found)


@dataclass
class Publisher:
    """Stage every output file under a hidden prefix; publish them only when all are written.

    A failed run calls abort(): the staging prefix is deleted and whatever an earlier run
    published stays untouched. publish() first removes the old _SUCCESS marker, moves files
    into place (os.replace locally: atomic per file), then writes _SUCCESS last, listing the
    files and the run id. A reader that checks _SUCCESS never sees a half-written result.
    """

    output_dir: str
    endpoint_url: str = ""

    def __post_init__(self) -> None:
        self.fs = filesystem(self.output_dir, self.endpoint_url)
        self.run_id = time.strftime("%Y%m%d_%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.root = strip_scheme(self.output_dir).rstrip("/")
        self.staging = join(self.root, f".staging-{self.run_id}")
        self.files: list[str] = []
        try:
            self.fs.makedirs(self.staging, exist_ok=True)
        except Exception as e:
            if is_s3(self.output_dir):
                raise _describe_s3_error(self.output_dir, e) from e
            raise UserError(f"{self.output_dir}: cannot create output directory: {e}") from e

    def path(self, name: str) -> str:
        """Staging path (no scheme) for an output file; parent folders are created."""
        full = join(self.staging, name)
        parent = full.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if name not in self.files:
            self.files.append(name)
        return full

    def open(self, name: str, mode: str = "wb"):
        return self.fs.open(self.path(name), mode)

    def write_text(self, name: str, text: str) -> None:
        with self.open(name, "w") as f:
            f.write(text)

    def put_file(self, local_path: str, name: str) -> None:
        self.fs.put_file(local_path, self.path(name))

    def publish(self, extra: dict | None = None) -> None:
        marker = join(self.root, SUCCESS)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        for name in self.files:
            src, dst = join(self.staging, name), join(self.root, name)
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
            if is_s3(self.output_dir):
                self.fs.mv(src, dst)
            else:
                os.replace(src, dst)
        manifest = {"run_id": self.run_id, "files": sorted(self.files),
                    "published_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
        with self.fs.open(marker, "w") as f:
            f.write(json.dumps(manifest, indent=2))
        self._remove_staging()

    def abort(self) -> None:
        self._remove_staging()

    def _remove_staging(self) -> None:
        try:
            if self.fs.exists(self.staging):
                self.fs.rm(self.staging, recursive=True)
        except Exception:  # best effort: the staging prefix is hidden and run-specific
            pass
