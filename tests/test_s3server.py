"""The S3 test harness (tests/s3server.py), checked only as far as the suite relies on it: a
real SeaweedFS comes up on loopback with the bucket, and stopping it leaves nothing behind."""

from __future__ import annotations

import socket

import pytest

import s3server
from s3server import S3Server


def test_server_is_up_on_loopback_with_its_bucket(s3):
    assert s3.running and s3server._pid_alive(s3.pid)
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    assert "semid-test" in s3.filesystem().ls("")


def test_stop_frees_process_port_and_dir(tmp_path):
    srv = S3Server(bucket=None, base_dir=tmp_path)
    with srv:
        pid, port, run_dir = srv.pid, srv.ports["s3"], srv.dir
        assert s3server._pid_alive(pid) and run_dir.is_dir()
    assert not s3server._pid_alive(pid) and not srv.running and not run_dir.exists()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the S3 port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
