"""A multi-node Ray cluster on this host, for tests: a head and worker nodes, each its own
`ray start --block` (own raylet, object store, ports and --temp-dir), token auth on, jobs
submitted with `ray job submit` exactly as a user submits them.

What this relies on (Ray 2.60, measured on a 2-core host):
- Every port is explicit, so two nodes never collide; temp dirs are short (Ray's unix socket
  paths are limited to ~107 bytes) and separate per node: with one temp dir shared by two nodes
  (one runtime_resources/ folder), a job's unpacked --working-dir vanished under the running
  driver, cleaned up by the other node's runtime-env agent.
- Token auth: RAY_AUTH_MODE=token with a fresh token in a private file (RAY_AUTH_TOKEN_PATH);
  `ray start` would otherwise pick up a stale ~/.ray/auth_token, which this never reads.
- A node loss is SIGKILL to a worker node's `ray start --block` and every process below it
  (raylet, workers, agents). The head's GCS declares it dead after missed health checks; the
  settings in HEAD_ENV shorten that from ~30 s to a few seconds. A replacement node is a fresh
  `ray start --address` with new ports and a new temp dir.
- Everything is stopped by PID (SIGTERM to each `ray start --block`, which stops what it
  started, then SIGKILL to what is left of its process tree): never `ray stop`, which kills
  every Ray on the host.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import psutil
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

# On the head: the GCS checks every raylet each second and declares a node dead after 3 missed
# checks (Ray's defaults take ~30 s); a SIGTERMed node stops without draining for 30 s first.
HEAD_ENV = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}


# Every job's driver: Ray Train's controller polls its workers every 0.5 s instead of 2 s (a tiny
# run waits for that poll to start, to take each checkpoint and to finish).
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def free_ports(n: int) -> list[int]:
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


class Node:
    """One `ray start --block` process (a head or a worker node) and its process tree."""

    def __init__(self, name: str, args: list[str], env: dict, base: str):
        self.name = name
        self.temp_dir = os.path.join(base, name)
        self.log_path = os.path.join(base, f"{name}.out")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.node_id: str | None = None
        self.tag = f"semid_node_{name}"  # a custom resource that names the node in Ray's tables

    def tree(self) -> list[psutil.Process]:
        try:
            top = psutil.Process(self.proc.pid)
            return [top] + top.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """A node loss: SIGKILL to the whole tree at once (collected before the first signal)."""
        _kill_all(self.tree())
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        tree = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_all(psutil.wait_procs(tree, timeout=10)[1])  # what SIGTERM left alive
        if not self.log.closed:
            self.log.close()

    def tail(self, n: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]


class Job:
    """A submitted job: its id, final status, driver exit code and log."""

    def __init__(self, cluster: Cluster, submission_id: str, t0: float):
        self.cluster, self.id, self.t0 = cluster, submission_id, t0
        self.info: dict = {}
        self.seconds = 0.0

    def logs(self) -> str:
        code, body = self.cluster.api(f"/api/jobs/{self.id}/logs")
        return json.loads(body).get("logs", "") if code == 200 else ""

    def status(self) -> str:
        code, body = self.cluster.api(f"/api/jobs/{self.id}")
        assert code == 200, body
        self.info = json.loads(body)
        return self.info["status"]

    def wait_log(self, text: str, timeout: float = 180) -> float:
        """Wait until the job's log contains text; returns the seconds since submission."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return time.monotonic() - self.t0
            assert self.status() in ("PENDING", "RUNNING"), (
                f"job ended before {text!r}:\n{self.logs()[-3000:]}"
            )
            time.sleep(0.25)
        raise AssertionError(f"{text!r} not in the job's log after {timeout}s:\n{self.logs()[-3000:]}")

    def wait(self, timeout: float = 300) -> Job:
        deadline = time.monotonic() + timeout
        while self.status() in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, f"job still running after {timeout}s:\n{self.logs()[-3000:]}"
            time.sleep(0.5)
        self.seconds = time.monotonic() - self.t0
        return self

    @property
    def ok(self) -> bool:
        return self.info.get("status") == "SUCCEEDED"

    @property
    def exit_code(self) -> int | None:
        code = self.info.get("driver_exit_code")
        return None if code is None else int(code)


class Cluster:
    """A head (3 CPUs, the job API) and worker nodes (3 CPUs each) on 127.0.0.1."""

    NODE_CPUS = 3

    def __init__(self, base: str, env: dict, worker_memory: int, head_memory: int = 4 << 30):
        self.base = base
        self.worker_memory = worker_memory
        token = os.urandom(32).hex()
        self.token = token
        token_path = os.path.join(base, "auth_token")
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        env = dict(env)
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(k, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=token_path,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # the entrypoint's `python` is the node's Python (an image's): here, this venv's
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        )
        self.env = env
        self.nodes: list[Node] = []
        self.gcs, dash, *p = free_ports(9)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.head = self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--ray-client-server-port={p[0]}",
                "--include-log-monitor=false",
                f"--memory={head_memory}",
            ],
            p[1:],
            {**env, **HEAD_ENV},
        )
        self._seq = 0

    def _start(self, name: str, args: list[str], ports: list[int], env: dict) -> Node:
        agent, agent_grpc, rt_agent, metrics, nm, om, *_ = ports
        node = Node(
            name,
            [
                *args,
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_agent}",
                f"--metrics-export-port={metrics}",
                f"--node-manager-port={nm}",
                f"--object-manager-port={om}",
                f"--num-cpus={self.NODE_CPUS}",
                "--resources=" + json.dumps({f"semid_node_{name}": 1}),
                "--object-store-memory=300000000",
                "--disable-usage-stats",
            ],
            env,
            self.base,
        )
        self.nodes.append(node)
        return node

    def add_worker(self) -> Node:
        self._seq += 1
        return self._start(
            f"w{self._seq}",
            [f"--address=127.0.0.1:{self.gcs}", f"--memory={self.worker_memory}"],
            free_ports(6),
            self.env,
        )

    # --- the job API ---------------------------------------------------------------------------
    def api(self, path: str, token: str | None = "") -> tuple[int, str]:
        token = self.token if token == "" else token
        req = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def wait_ready(self, n_nodes: int, timeout: float = 120) -> None:
        """The job API answers and n_nodes are alive; records each node's id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.head.proc.poll() is None, f"ray start --head exited:\n{self.head.tail()}"
            try:
                nodes = self.alive_nodes()
            except (OSError, AssertionError, ValueError):
                nodes = []
            if len(nodes) >= n_nodes:
                self._match_node_ids(nodes)
                return
            time.sleep(0.5)
        raise AssertionError(f"{n_nodes} nodes not alive after {timeout}s:\n{self.head.tail()}")

    def alive_nodes(self) -> list[dict]:
        code, body = self.api("/api/v0/nodes?limit=100&detail=true")
        assert code == 200, body
        rows = json.loads(body)["data"]["result"]["result"]
        return [r for r in rows if r["state"] == "ALIVE"]

    def _match_node_ids(self, nodes: list[dict]) -> None:
        """Each node's id, found by the one-unit custom resource named after it (_start)."""
        for node in self.nodes:
            for r in nodes:
                if node.tag in r.get("resources_total", {}):
                    node.node_id = r["node_id"]

    def wait_dead(self, node: Node, timeout: float = 60) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if node.node_id not in {r["node_id"] for r in self.alive_nodes()}:
                return time.monotonic() - t0
            time.sleep(0.25)
        raise AssertionError(f"node {node.name} still alive {timeout}s after it was killed")

    def actors(self, class_name: str) -> list[dict]:
        q = urllib.parse.urlencode(
            {
                "limit": 1000,
                "detail": "true",
                "filter_keys": "class_name",
                "filter_predicates": "=",
                "filter_values": class_name,
            }
        )
        code, body = self.api(f"/api/v0/actors?{q}")
        assert code == 200, body
        return json.loads(body)["data"]["result"]["result"]

    def submit(self, module: str, args: list[str], env_vars: dict | None = None) -> Job:
        """`ray job submit --no-wait --working-dir . --runtime-env-json <jobs/runtime_env.yaml
        minus pip>`: this "cluster" runs in our venv, which has the dependencies already (a real
        one installs the pip list; there is no network here)."""
        with open(os.path.join(ROOT, "jobs", "runtime_env.yaml")) as f:
            runtime_env = {k: v for k, v in yaml.safe_load(f).items() if k != "pip"}
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **JOB_ENV, **(env_vars or {})}
        sid = f"semid-{module.split('.')[-1]}-{os.getpid()}-{time.monotonic_ns()}"
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--submission-id",
            sid,
            "--no-wait",
            "--",
            "python",
            "-m",
            module,
            *args,
        ]
        t0 = time.monotonic()
        out = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return Job(self, sid, t0)

    def run(self, module: str, args: list[str], timeout: float = 300, **kw) -> Job:
        return self.submit(module, args, **kw).wait(timeout)

    def worker(self) -> Node:
        """The worker node that is up (the tests replace a lost one)."""
        up = [n for n in self.nodes if n is not self.head and n.proc.poll() is None]
        assert len(up) == 1, [n.name for n in up]
        return up[0]

    def lose_worker(self) -> tuple[Node, float]:
        """SIGKILL the worker node's process tree, wait until the GCS declares it dead, start a
        fresh node in its place; returns (the new node, seconds until the loss was noticed)."""
        lost = self.worker()
        lost.kill()
        noticed = self.wait_dead(lost)
        fresh = self.add_worker()
        self.wait_ready(2)
        assert fresh.node_id and fresh.node_id != lost.node_id
        return fresh, noticed

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def read_json(fs, uri: str) -> dict:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(uri.replace("s3://", "")))


def _kill_all(procs: list) -> None:
    """SIGKILL every process (collected before the first signal), then reap them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def mapping(fs, out: str) -> dict[int, tuple]:
    """A published result's IDs, after checking its _SUCCESS."""
    root = out.replace("s3://", "").rstrip("/")
    fs.invalidate_cache()
    assert fs.exists(f"{root}/_SUCCESS"), f"{out}: no _SUCCESS"
    raw = json.loads(fs.cat_file(f"{root}/semantic_id_mappings.json"))
    return {int(k): tuple(v) for k, v in raw.items()}


class Hold:
    """The SEMID_DIST_TEST_HOLD hook (semid_dist/testhooks.py): the named passes (or tiger's
    "tiger_epoch_N") wait at their first block until release(); markers name the node each
    waiting process is on."""

    def __init__(self, names: str, base: str):
        self.dir = os.path.join(base, f"hold-{time.monotonic_ns()}")
        os.makedirs(self.dir)
        self.env = {"SEMID_DIST_TEST_HOLD": f"{names}:{self.dir}"}

    def markers(self) -> list[str]:
        return [m for m in os.listdir(self.dir) if m != "release"]

    def wait(self, job: Job, node_id: str | None = None, timeout: float = 180) -> list[str]:
        """Wait for a process to be held (on node_id, when given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.markers() if node_id is None or node_id in m]
            if found:
                return found
            assert job.status() in ("PENDING", "RUNNING"), f"job ended before the hold:\n{job.logs()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(
            f"nothing held after {timeout}s (markers {self.markers()}):\n{job.logs()[-3000:]}"
        )

    def wait_all(self, job: Job, n: int, settle: float = 0.0) -> None:
        """Wait for n held processes, then settle seconds (e.g. for Ray Train's controller to
        take the checkpoint the held workers just reported: it polls every 2 s)."""
        deadline = time.monotonic() + 120
        while len(self.markers()) < n:
            assert time.monotonic() < deadline, self.markers()
            assert job.status() in ("PENDING", "RUNNING"), job.logs()[-3000:]
            time.sleep(0.2)
        time.sleep(settle)

    def release(self) -> None:
        open(os.path.join(self.dir, "release"), "w").close()
