"""`ray job submit` for real: a private Ray head with the job API, a kmeans job against S3.

The head is started like a cluster node: `ray start --head --block` on 127.0.0.1 with its own
temp dir and ports, S3 credentials in its environment (as a KubeRay Secret would put them),
and Ray token authentication on (RAY_AUTH_MODE=token with a fresh token in a private file:
Ray 2.60 enables token auth by default only for clusters started by ray.init(); `ray start`
enables it when it finds a token, e.g. a stale ~/.ray/auth_token, so the test sets it
explicitly and never reads or writes ~/.ray). The job is submitted with the `ray` CLI, which
sends the token from the same two variables. The head is stopped by its PID (SIGTERM to the
blocking `ray start`, which then stops every process it started; anything left of its process
tree is killed by PID) - never `ray stop`, which would kill every Ray on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import make_catalog, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RUNTIME_ENV = os.path.join(ROOT, "jobs", "runtime_env.yaml")

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _runtime_env() -> dict:
    with open(RUNTIME_ENV) as f:
        return yaml.safe_load(f)


def test_runtime_env_file_matches_pyproject():
    """jobs/runtime_env.yaml: what the cluster lacks (pyproject deps + gpu extra, never Ray),
    and an upload without venvs, outputs or git history."""
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    RuntimeEnv(**env)  # Ray's own validation
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = {
        canonicalize_name(Requirement(r).name): str(Requirement(r).specifier)
        for r in project["dependencies"] + project["optional-dependencies"]["gpu"]
    }
    wanted.pop("ray")
    got = {
        canonicalize_name(Requirement(r).name): str(Requirement(r).specifier) for r in env["pip"]["packages"]
    }
    assert got == wanted
    for must in (".git/", ".venv/", "output/", "logs/"):
        assert must in env["excludes"], must
    assert "working_dir" not in env, "the working dir comes from --working-dir on the command line"
    assert not any("AWS" in k or "TOKEN" in k for k in env.get("env_vars", {}))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class RayHead:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports."""

    def __init__(self, env: dict, tmp: str):
        import psutil

        self.psutil = psutil
        gcs, dash, client, agent, agent_grpc, rt_agent, metrics, nm, om = _free_ports(9)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.log = open(os.path.join(tmp, "ray-start.out"), "w")
        self.proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                f"--temp-dir={tmp}/ray",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_agent}",
                f"--metrics-export-port={metrics}",
                f"--node-manager-port={nm}",
                f"--object-manager-port={om}",
                "--num-cpus=4",
                "--disable-usage-stats",
                "--include-log-monitor=false",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, token: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ray start exited: {self.tail()}"
            try:
                if _get(f"{self.dashboard}/api/jobs/", token)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"Ray job API not up after {timeout}s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        """SIGTERM to our `ray start` (it stops the processes it started), then SIGKILL to
        whatever of its process tree is still there: by PID only, never `ray stop`."""
        ps = self.psutil
        try:
            tree = [ps.Process(self.proc.pid)] + ps.Process(self.proc.pid).children(recursive=True)
        except ps.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = ps.wait_procs(tree, timeout=15)
        for p in alive:
            try:
                p.kill()
            except ps.NoSuchProcess:
                pass
        ps.wait_procs(alive, timeout=10)
        self.log.close()


@pytest.mark.slow
def test_ray_job_submit_kmeans_on_s3(s3):
    pytest.importorskip("psutil")
    fs = s3.filesystem()
    ids, x = make_catalog(300, 16, seed=3)
    tmp = tempfile.mkdtemp(prefix="semid-job-", dir="/tmp")  # short: Ray's unix socket paths
    try:
        write_shards(os.path.join(tmp, "catalog"), ids, x, 2)
        fs.put(os.path.join(tmp, "catalog") + "/", "semid-test/jobs/catalog/", recursive=True)

        token = os.urandom(32).hex()
        token_path = os.path.join(tmp, "auth_token")
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        env = s3.subprocess_env()  # the node's S3 credentials, as a Secret would set them
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(k, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=token_path,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            # on SIGTERM, stop at once instead of draining the node for 30 s first
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # the entrypoint's `python` is the node's Python (an image's): here, this venv's
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        )

        t0 = time.monotonic()
        head = RayHead(env, tmp)
        try:
            head.wait_ready(token)
            t_up = time.monotonic() - t0
            # token auth is really on: no token -> 401, a wrong one -> 403
            assert _get(f"{head.dashboard}/api/jobs/", None)[0] == 401
            assert _get(f"{head.dashboard}/api/jobs/", "0" * 64)[0] == 403

            # jobs/runtime_env.yaml minus pip: this "cluster" runs in our venv, which already
            # has the dependencies (a real one installs them from the pip list; no network here).
            runtime_env = {k: v for k, v in _runtime_env().items() if k != "pip"}
            out = "s3://semid-test/jobs/kmeans/"
            submission_id = f"semid-test-{os.getpid()}-{int(time.time())}"
            cmd = [
                RAY,
                "job",
                "submit",
                "--address",
                head.dashboard,
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps(runtime_env),
                "--submission-id",
                submission_id,
                "--",
                "python",
                "-m",
                "jobs.train",
                "--data_path",
                "s3://semid-test/jobs/catalog/",
                "--output_dir",
                out,
                "--mode",
                "kmeans",
                "--n_layers",
                "2",
                "--n_clusters",
                "8",
                "--max_iters",
                "5",
            ]
            t1 = time.monotonic()
            job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
            t_job = time.monotonic() - t1
            console = job.stdout + job.stderr
            assert job.returncode == 0, console[-4000:]
            code, body = _get(f"{head.dashboard}/api/jobs/{submission_id}", token)
            assert code == 200, body
            info = json.loads(body)
            assert info["status"] == "SUCCEEDED", info
            assert "AWS" not in json.dumps(info.get("runtime_env", {}))  # credentials stay on the nodes
            assert "semid_dist kmeans: 300 items" in console  # the driver's summary, streamed back
        finally:
            head.stop()
        assert head.proc.poll() is not None
        print(f"ray head up in {t_up:.1f}s, job submit -> SUCCEEDED in {t_job:.1f}s")

        fs.invalidate_cache()
        root = out.replace("s3://", "")
        manifest = json.loads(fs.cat_file(root + "_SUCCESS"))
        assert {
            "semantic_id_mappings.json",
            "semantic_id_mappings.parquet",
            "final_model.pt",
            "training_results.json",
        } <= set(manifest["files"])
        mapping = json.loads(fs.cat_file(root + "semantic_id_mappings.json"))
        assert sorted(map(int, mapping)) == sorted(ids.tolist())
        assert len({tuple(v) for v in mapping.values()}) == len(mapping)
        results = json.loads(fs.cat_file(root + "training_results.json"))
        assert results["input"]["files"] == 2 and results["mode"] == "kmeans"
        for name in manifest["files"]:
            assert s3.secret_key.encode() not in fs.cat_file(root + name), name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
