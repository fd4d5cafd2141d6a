"""S3 end to end against a real S3 server (SeaweedFS, the session fixture ``s3``), no mocks.

Runs that need Ray are subprocesses started the way a user starts them: ``python -m semid_dist``
with the standard AWS_* environment (``s3.subprocess_env()``); each starts its own local Ray in
a private temp dir with its own auth token. (The session's in-process Ray may have started
before the S3 server existed, so its workers could not see the credentials.) Failures that
happen before any Ray work (credentials, buckets) run in-process.

Covered: sharded parquet under s3://, outputs published to s3:// with _SUCCESS last, tiger with
its Ray Train checkpoints on s3:// (when semid_dist.tiger imports), wrong credentials, missing
buckets, encode-only with a tokenizer on s3:// and --s3_endpoint_url overriding AWS_ENDPOINT_URL
in a run whose server disappears while the outputs are being written, and no credential in any
output object, log or console line. (Encode-only's successful publish is tested locally in
test_encode_only.py; publishing to S3 by the kmeans, tiger and `ray job submit` runs.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from conftest import make_catalog, write_shards
from semid_dist.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "semid-test"
CATALOG = f"s3://{BUCKET}/catalogs/small/"
KMEANS_OUT = f"s3://{BUCKET}/runs/kmeans/"
KMEANS = ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "16", "--max_iters", "10"]
OUTPUTS = {
    "semantic_id_mappings.json",
    "semantic_id_mappings.parquet",
    "small.index.json",
    "prefix_tree.parquet",
    "tokens.json",
    "final_model.pt",
    "training_results.json",
    "quality_report.html",
    "_SUCCESS",
}


def product_env(s3, tmp: str) -> dict:
    """The S3 server's AWS_* variables plus a private Ray: its own temp dir (Ray finds no other
    cluster through /tmp/ray) and its own token (nothing written to ~/.ray)."""
    env = s3.subprocess_env()
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    token = os.path.join(tmp, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    env.update(
        RAY_TMPDIR=tmp,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


class Run:
    """One `python -m semid_dist ...` subprocess with a private Ray; keeps its console output."""

    def __init__(
        self,
        s3,
        argv: list[str],
        env_extra: dict | None = None,
        code: str | None = None,
        timeout: float = 240,
    ):
        self.tmp = tempfile.mkdtemp(prefix="semid-s3-", dir="/tmp")  # short: Ray's unix sockets
        self.log_dir = os.path.join(self.tmp, "logs")
        env = product_env(s3, self.tmp)
        env.update(env_extra or {})
        head = ["-c", code] if code else ["-m", "semid_dist"]
        # own process group: on a timeout the run and the Ray it started are killed together
        proc = subprocess.Popen(
            [sys.executable, *head, *argv, "--log_dir", self.log_dir],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            self.stdout, self.stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            self.stdout, self.stderr = proc.communicate()
            self.stderr += f"\n[test] killed after {timeout}s"
        self.rc = proc.returncode

    def texts(self) -> dict[str, bytes]:
        """Console output, the run's log file and everything Ray logged, by name."""
        out = {"stdout": self.stdout.encode(), "stderr": self.stderr.encode()}
        for d, _, names in os.walk(self.tmp):
            for n in names:
                p = os.path.join(d, n)
                if os.path.isfile(p) and not os.path.islink(p) and n != "auth_token":
                    with open(p, "rb") as f:
                        out[p] = f.read()
        return out

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def fs_for(s3) -> s3fs.S3FileSystem:
    fs = s3.filesystem()
    fs.invalidate_cache()
    return fs


def visible(fs, prefix: str) -> dict[str, bytes]:
    """What a reader sees under prefix: every object except hidden ones (names starting with
    '.': .staging-<run id>/, .ray_train/), by name relative to prefix."""
    root = prefix.replace("s3://", "").rstrip("/")
    fs.invalidate_cache()
    names = (p[len(root) + 1 :] for p in fs.find(root))
    return {
        n: fs.cat_file(f"{root}/{n}") for n in names if n and not n.startswith(".") and not n.endswith("/")
    }  # "x/": a folder marker


@pytest.fixture(scope="module")
def s3_catalog(s3, tmp_path_factory):
    """600 x 32-d items in 3 parquet shards under s3://semid-test/catalogs/small/."""
    local = tmp_path_factory.mktemp("s3_catalog")
    ids, x = make_catalog(600, 32, seed=1)
    write_shards(str(local), ids, x, 3)
    fs_for(s3).put(str(local) + "/", CATALOG.replace("s3://", ""), recursive=True)
    return ids, x


@pytest.fixture(scope="module")
def runs():
    """Every subprocess run of this module, for the credential sweep at the end."""
    done: list[Run] = []
    yield done
    for r in done:
        r.cleanup()


@pytest.fixture(scope="module")
def kmeans_run(s3, s3_catalog, runs):
    run = Run(s3, ["train", "--data_path", CATALOG, "--output_dir", KMEANS_OUT, *KMEANS])
    runs.append(run)
    assert run.rc == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_kmeans_reads_shards_and_publishes_to_s3(s3, s3_catalog, kmeans_run):
    ids, x = s3_catalog
    fs = fs_for(s3)
    out = visible(fs, KMEANS_OUT)
    logs = [k for k in out if k.startswith("logs/")]
    assert set(out) == OUTPUTS | set(logs) and len(logs) == 1, sorted(out)
    assert not [p for p in fs.ls(KMEANS_OUT.replace("s3://", "")) if "/.staging-" in p]

    manifest = json.loads(out["_SUCCESS"])
    assert set(manifest["files"]) == set(out) - {"_SUCCESS"}
    results = json.loads(out["training_results.json"])
    assert results["input"] == {"files": 3, "rows": 600, "items": 600, "dim": 32}
    assert results["run_id"] == manifest["run_id"]
    assert results["config"]["data_path"] == CATALOG and results["config"]["output_dir"] == KMEANS_OUT
    assert 0 < results["metrics"]["relative_reconstruction_error"] < 1

    mapping = json.loads(out["semantic_id_mappings.json"])
    assert sorted(map(int, mapping)) == sorted(ids.tolist())
    assert len({tuple(v) for v in mapping.values()}) == len(mapping)
    with fs.open(KMEANS_OUT.replace("s3://", "") + "semantic_id_mappings.parquet", "rb") as f:
        table = pq.read_table(f)
    assert dict(
        zip(
            table.column("ItemID").to_pylist(),
            map(list, table.column("semantic_id").to_pylist()),
            strict=True,
        )
    ) == {int(k): v for k, v in mapping.items()}
    from semid_dist import load_tokenizer

    # The Python API reads the model from S3; the explicit endpoint wins over the environment's.
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        tok = load_tokenizer(KMEANS_OUT + "final_model.pt", endpoint_url=endpoint)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    order = np.argsort(ids)[:40]
    assert np.array_equal(tok.encode(x[order]), np.array([mapping[str(i)][:3] for i in ids[order]]))
    assert f"outputs:                     {KMEANS_OUT}" in kmeans_run.stdout


@pytest.mark.slow
def test_tiger_checkpoints_and_outputs_on_s3(s3, s3_catalog, runs):
    out = f"s3://{BUCKET}/runs/tiger/"
    run = Run(
        s3,
        [
            "train",
            "--data_path",
            CATALOG,
            "--output_dir",
            out,
            "--mode",
            "tiger",
            "--n_layers",
            "2",
            "--n_embed",
            "8",
            "--latent_dim",
            "4",
            "--batch_size",
            "64",
            "--epochs",
            "2",
            "--save_every",
            "1",
            "--patience",
            "0",
        ],
        timeout=300,
    )
    runs.append(run)
    assert run.rc == 0, run.stderr[-3000:]
    fs = fs_for(s3)
    published = visible(fs, out)
    assert OUTPUTS <= set(published), sorted(published)
    results = json.loads(published["training_results.json"])
    assert results["mode"] == "tiger" and results["input"]["items"] == 600
    # Ray Train's checkpoints live on S3 too (default <output_dir>/.ray_train), not on local disk
    root = out.replace("s3://", "")
    checkpoints = [p for p in fs.find(root + ".ray_train") if "checkpoint" in p]
    assert checkpoints, fs.find(root)


def in_process(argv, capsys) -> tuple[int, str]:
    s3fs.S3FileSystem.clear_instance_cache()  # credentials are read when a client is made
    try:
        rc = main(argv)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    stderr = capsys.readouterr().err.strip()
    return rc, stderr


def assert_one_line_error(rc, stderr, *needles) -> str:
    assert rc == 2, stderr
    line = stderr.splitlines()[-1]
    assert line.startswith("semid: error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in line, line
    return line


def test_wrong_credentials(s3, s3_catalog, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + "x" * 24)
    out = f"s3://{BUCKET}/runs/wrong-credentials/"
    rc, stderr = in_process(
        ["train", "--data_path", CATALOG, "--output_dir", out, *KMEANS, "--log_dir", str(tmp_path / "logs")],
        capsys,
    )
    assert_one_line_error(rc, stderr, CATALOG, "access denied by S3")
    assert s3.secret_key not in stderr and "not-the-secret" not in stderr
    assert not fs_for(s3).exists(out.replace("s3://", ""))


@pytest.mark.parametrize("side", ["data_path", "output_dir"])
def test_missing_bucket(s3, s3_catalog, side, tmp_path, capsys):
    missing = "s3://no-such-bucket-semid/prefix/"
    paths = {"data_path": CATALOG, "output_dir": f"s3://{BUCKET}/runs/unused/", side: missing}
    rc, stderr = in_process(
        [
            "train",
            "--data_path",
            paths["data_path"],
            "--output_dir",
            paths["output_dir"],
            *KMEANS,
            "--log_dir",
            str(tmp_path / "logs"),
        ],
        capsys,
    )
    assert_one_line_error(rc, stderr, missing, "S3 bucket 'no-such-bucket-semid' does not exist")
    fs = fs_for(s3)
    assert "no-such-bucket-semid" not in fs.ls("")  # never created behind the user's back
    assert not fs.exists(f"{BUCKET}/runs/unused")


def test_an_orphaned_s3_io_error_prints_no_traceback(caplog):
    """A dropped connection fails aiohttp's body-writer task next to the request that reports
    the error; nobody awaits the writer, and asyncio would print its traceback to the user's
    console when the task is collected (it broke the one-line error of the outage test below
    in CI). On the S3 client's I/O loop it goes to the debug log instead."""
    import gc

    from fsspec.asyn import sync

    from semid_dist.io.storage import Storage

    fs = Storage.resolve().fs(f"s3://{BUCKET}/any/")

    async def drop_a_failed_task():
        async def writer():
            raise ConnectionResetError("Cannot write to closing transport")

        task = asyncio.ensure_future(writer())
        await asyncio.sleep(0)
        assert task.done()
        del task
        gc.collect()

    ours = logging.getLogger("semid_dist")  # a CLI run in this process sets its handlers
    debug_records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.DEBUG)
    catch.emit = debug_records.append
    level = ours.level
    ours.addHandler(catch)
    ours.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            sync(fs.loop, drop_a_failed_task)
    finally:
        ours.removeHandler(catch)
        ours.setLevel(level)
    loud = [r for r in caplog.records + debug_records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert any("Cannot write to closing transport" in r.getMessage() for r in debug_records), [
        r.getMessage() for r in debug_records
    ]


# Runs `python -m semid_dist ARGS` with S3 reached through a TCP proxy that this process owns;
# the proxy dies (connections reset, port closed: the server is gone) at the HOOK: when the run
# starts to stage final_model.pt (after the mappings were staged, before anything is
# published), or when the encode pass starts.
VANISHING_S3 = r"""
import os, socket, sys, threading
from semid_dist import export
from semid_dist.cli import main

class Proxy:
    def __init__(self, upstream):
        self.upstream, self.socks, self.lock, self.gone = upstream, [], threading.Lock(), False
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.srv.accept()
                if self.gone:
                    client.close()
                    return
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            with self.lock:
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def vanish(self):
        self.gone = True
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.srv.close()
        with self.lock:
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

host, port = os.environ["S3_UPSTREAM"].rsplit(":", 1)
proxy = Proxy((host, int(port)))
HOOK
sys.exit(main(sys.argv[1:] + ["--s3_endpoint_url", f"http://127.0.0.1:{proxy.port}"]))
"""
VANISH_WHEN_STAGING_THE_MODEL = VANISHING_S3.replace(
    "HOOK",
    """
write_torch = export.write_torch

def vanishing_write_torch(*args, **kwargs):
    print("test hook: the S3 server disappears now", file=sys.stderr, flush=True)
    proxy.vanish()
    return write_torch(*args, **kwargs)

export.write_torch = vanishing_write_torch
""",
)
# ... or when the encode pass starts: every read task then finds the server gone.
VANISH_WHEN_ENCODING = VANISHING_S3.replace(
    "HOOK",
    """
from semid_dist.catalog import plumbing
map_catalog = plumbing.map_catalog

def vanishing_map(ds, fn, empty, what, *args, **kwargs):
    if what == "encode":
        print("test hook: the S3 server disappears now", file=sys.stderr, flush=True)
        proxy.vanish()
    return map_catalog(ds, fn, empty, what, *args, **kwargs)

plumbing.map_catalog = vanishing_map
""",
)


@pytest.mark.slow
def test_server_disappearing_mid_run_publishes_nothing(s3, kmeans_run, runs):
    """`semid encode` with the tokenizer on S3, writing over the kmeans run's published result;
    S3 is reached only through --s3_endpoint_url (AWS_ENDPOINT_URL points at a closed port, so
    listing, footers, the tokenizer download and the Ray Data reads in the workers all prove
    that the flag wins), and the server vanishes while the outputs are being staged. The
    earlier result survives byte for byte; the run fails with one line."""
    fs = fs_for(s3)
    before = visible(fs, KMEANS_OUT)
    assert "_SUCCESS" in before
    run = Run(
        s3,
        [
            "encode",
            "--data_path",
            CATALOG,
            "--output_dir",
            KMEANS_OUT,
            "--tokenizer",
            KMEANS_OUT + "final_model.pt",
        ],
        code=VANISH_WHEN_STAGING_THE_MODEL,
        env_extra={"S3_UPSTREAM": f"127.0.0.1:{s3.ports['s3']}", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )
    runs.append(run)
    assert "applying kmeans tokenizer " + KMEANS_OUT + "final_model.pt" in run.stderr, run.stderr[-3000:]
    assert "stage encode: " in run.stderr, run.stderr[-3000:]  # every row read through the flag
    assert "test hook: the S3 server disappears now" in run.stderr, run.stderr[-3000:]
    assert_one_line_error(run.rc, run.stderr.strip(), KMEANS_OUT, "S3 request failed")
    assert visible(fs, KMEANS_OUT) == before  # nothing published, nothing half-replaced
    # What the run had staged before the server went away stays hidden under .staging-<run>
    # (it could not be deleted either); the run said so.
    staged = [p for p in fs.find(KMEANS_OUT.replace("s3://", "")) if "/.staging-" in p]
    assert any(p.endswith("/semantic_id_mappings.json") for p in staged), staged
    assert not any(p.endswith("/_SUCCESS") for p in staged)
    assert "could not remove the staging area" in run.stderr


@pytest.mark.slow
def test_server_disappearing_during_a_data_pass(s3, s3_catalog, runs):
    """The server goes away as the encode pass starts: the read tasks fail, the run stops with
    one line naming a catalog file once S3 has failed for --s3_retry_budget_s, and nothing is
    published."""
    out = f"s3://{BUCKET}/runs/outage-in-encode/"
    t0 = time.monotonic()
    run = Run(
        s3,
        ["train", "--data_path", CATALOG, "--output_dir", out, *KMEANS, "--s3_retry_budget_s", "10"],
        code=VANISH_WHEN_ENCODING,
        env_extra={"S3_UPSTREAM": f"127.0.0.1:{s3.ports['s3']}"},
    )
    took = time.monotonic() - t0
    runs.append(run)
    assert "stage scan: " in run.stderr and "stage fit: " in run.stderr, run.stderr[-3000:]
    assert "test hook: the S3 server disappears now" in run.stderr, run.stderr[-3000:]
    line = assert_one_line_error(run.rc, run.stderr.strip(), CATALOG, "cannot read parquet")
    assert ".parquet" in line and "--s3_retry_budget_s 10" in line, line
    print(f"gave up after {took:.0f} s: {line}")
    assert took < 90, f"the run took {took:.0f} s to give up"  # start-up, scan, fit, then 10 s
    assert visible(fs_for(s3), out) == {}


@pytest.mark.slow
def test_no_credentials_in_outputs_logs_or_checkpoints(s3, runs):
    """Every object in the bucket (outputs, logs, staging leftovers, Ray Train checkpoints),
    every run's console output, log file and Ray session logs: no key appears anywhere."""
    assert runs, "no run to check"
    fs = fs_for(s3)
    objects = {p: fs.cat_file(p) for p in fs.find(BUCKET)}
    assert any(p.endswith("training_results.json") for p in objects)
    texts = dict(objects)
    for run in runs:
        texts.update(run.texts())
        assert any(p.endswith(".log") and "/logs/" in p for p in run.texts()), "no local log file"
    for secret in (s3.secret_key, s3.access_key):
        leaks = [name for name, blob in texts.items() if secret.encode() in blob]
        assert not leaks, f"credential found in {leaks[:5]}"
