"""Publish-when-complete outputs: stage every file under a hidden prefix, then publish.

A reader that checks ``_SUCCESS`` never sees a half-written result, and a failed run leaves an
earlier run's results untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

from semid_dist.errors import UserError, one_line
from semid_dist.io.retry import fail_fast
from semid_dist.io.storage import Storage, describe_s3_error, is_s3, join, strip_scheme

SUCCESS = "_SUCCESS"
STARTED = "_STARTED"  # first object of a staging prefix: proves the destination is writable

log = logging.getLogger("semid_dist")


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

    def __init__(self, output_dir: str, store: Storage) -> None:
        self.output_dir = output_dir
        self.s3 = is_s3(output_dir)
        self.fs = store.fs(output_dir)
        self.run_id = time.strftime("%Y%m%d_%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.root = strip_scheme(self.output_dir).rstrip("/")
        self.staging = join(self.root, f".staging-{self.run_id}")
        self.files: list[str] = []
        try:
            if self.s3:
                store.check_bucket(self.output_dir)
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
        """After a failure: one try at removing the staging area, no retry budget (the run may
        have failed because S3 is down); a staging prefix left behind is named in the log."""
        if not self.s3:
            self._remove_staging()
            return
        with fail_fast():
            self._remove_staging()

    def _remove_staging(self) -> None:
        try:  # no exists() first: s3fs answers False to every error, an outage included
            self.fs.invalidate_cache()
            self.fs.rm(self.staging, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # best effort: the staging prefix is hidden and run-specific
            where = ("s3://" if self.s3 else "") + self.staging
            log.warning(
                "could not remove the staging area %s (%s); it is hidden from readers and can be deleted",
                where,
                one_line(e),
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
