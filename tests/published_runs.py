"""A real published kmeans run on the embedded catalog, made once per test session through the
installed ``semid`` entry point and shared by the report and inspect tests. It runs the relocate
collision policy, so the codes before and after the policy differ."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(HERE)
FILMS = os.path.join(REPO, "semid_dist", "data", "wikidata_films")
TITLES = os.path.join(FILMS, "items.parquet")
SEMID = os.path.join(os.path.dirname(sys.executable), "semid")
N_ITEMS, N_LAYERS, N_CLUSTERS = 600, 3, 8

RAY_START_TIMEOUT = "timed out during startup"
_made: dict[str, str] = {}


def semid(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([SEMID, *args], capture_output=True, text=True, timeout=timeout, env=env)


def kmeans_run(tmp_path_factory) -> str:
    """The output dir of `semid train --mode kmeans` on the first N_ITEMS films (made once)."""
    if "kmeans" not in _made:
        base = tmp_path_factory.mktemp("published")
        out = str(base / "kmeans")
        args = [
            "train",
            "--mode", "kmeans",
            "--data_path", FILMS,
            "--output_dir", out,
            "--log_dir", str(base / "logs"),
            "--max_items", str(N_ITEMS),
            "--n_layers", str(N_LAYERS),
            "--n_clusters", str(N_CLUSTERS),
            "--max_iters", "5",
            "--collision_policy", "relocate",
            "--item_titles", TITLES,
        ]  # fmt: skip
        p = semid(*args)
        if p.returncode != 0 and RAY_START_TIMEOUT in p.stderr:  # a host too busy to start Ray in time
            p = semid(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        _made["kmeans"] = out
    return _made["kmeans"]
