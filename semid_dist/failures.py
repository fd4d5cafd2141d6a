"""One line for a Ray Train run (tiger, evaluate) that failed on its workers: a user error, a lost
node, a crash."""

from __future__ import annotations

import time

import ray

from semid_dist.errors import find_user_error

# How long to wait for the GCS to declare a node dead when a worker's actor vanished (it misses
# a few health checks first): only to name the node in the message.
NODE_DEATH_WAIT_S = 10.0


class TrainingError(RuntimeError):
    """Training failed on a worker more often than --max_failures allows."""


def dead_nodes() -> dict[str, str]:
    """The cluster's dead nodes: node id -> address."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if not n.get("Alive")}


def training_failed(
    e: Exception, max_failures: int, run_dir: str, dead_before: dict[str, str], what: str = "tiger"
) -> Exception:
    """The exception the run stops with: a worker's UserError as is; otherwise what failed on
    which rank (naming the node when a node was lost) and how to continue."""
    failures = getattr(e, "worker_failures", None) or {}
    for exc in failures.values():
        user = find_user_error(exc)
        if user is not None:
            return user
    if failures:
        rank, exc = sorted(failures.items())[0]
        cause = f"worker rank {rank}: {first_line(exc)}"
        # Ray Train reports a worker that stopped answering as a failed health check
        causes = (exc, _cause(exc), getattr(exc, "health_check_failure", None))
        if any(isinstance(x, ray.exceptions.RayActorError) for x in causes):
            lost = _newly_dead(dead_before)
            if lost:
                where = ", ".join(f"{addr} (node {nid[:12]})" for nid, addr in lost.items())
                cause = f"lost a node of the Ray cluster: {where}, and worker rank {rank} with it"
            else:
                cause = f"lost worker rank {rank} (its process or node died): {first_line(exc)}"
    else:
        cause = first_line(e)
    return TrainingError(
        f"{what} training failed ({cause}) after {max_failures} restart(s) allowed by "
        f"--max_failures; checkpoints are kept in {run_dir}: rerun with --resume to continue"
    )


def _newly_dead(before: dict[str, str]) -> dict[str, str]:
    deadline = time.monotonic() + NODE_DEATH_WAIT_S
    while True:
        try:
            lost = {k: v for k, v in dead_nodes().items() if k not in before}
        except Exception:  # the GCS is unreachable: name no node
            return {}
        if lost or time.monotonic() > deadline:
            return lost
        time.sleep(0.5)


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)  # RayTaskError keeps the worker's own exception here
    return cause if isinstance(cause, BaseException) else exc


def first_line(exc: BaseException) -> str:
    text = str(_cause(exc)).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's wrappers put the traceback first and the original "Type: message" last.
    return (lines[-1] if lines else type(exc).__name__)[:300]
