"""jobs/runtime_env.yaml, the runtime_env of every `ray job submit` (Makefile, cluster/README.md).
The jobs themselves run on a two-node cluster in tests/test_cluster_jobs.py, test_node_loss.py
and test_s3_outage.py (tests/cluster.py)."""

from __future__ import annotations

import os

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
