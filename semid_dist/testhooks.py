"""The hooks the test suite uses to put a run in a known state; users never set them.

Each is switched on by an environment variable that a test sets for the processes of a run
(the driver, or a Ray job's runtime_env); switched off, every call here returns at once, so the
product loops call them unconditionally and carry no test branches.

- ``SEMID_DIST_TEST_HOLD="<name>[,<name>...]:<dir>"``: every block of the catalog passes whose
  block function has one of those names (``catalog/plumbing.py``), and tiger's workers once the
  checkpoint of epoch N is reported ("tiger_epoch_N", ``tiger/worker.py``), leave a marker file
  in dir named after their node and wait until dir holds a file named "release", so that a test
  can lose a node or S3 at a known point of a run.
- ``SEMID_DIST_TEST_FAIL_AT_STEP=N``: tiger's last rank raises once at training step N (a marker
  in the Ray Train run folder keeps the restarted group from raising again), so that a test
  sees a worker failure and the restart from the last checkpoint. The driver reads it
  (``fail_at_step``) and hands it to the workers with the loop's config.
"""

from __future__ import annotations

import os
import time

HOLD_ENV = "SEMID_DIST_TEST_HOLD"
FAIL_AT_STEP_ENV = "SEMID_DIST_TEST_FAIL_AT_STEP"


def hold(name: str, timeout: float = 300.0) -> None:
    """Wait at the point `name` while the HOLD_ENV hook names it (see the module docstring)."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    names, _, where = spec.rpartition(":")
    release = os.path.join(where, "release")
    if name not in names.split(",") or os.path.exists(release):
        return
    import ray

    node = ray.get_runtime_context().get_node_id()
    open(os.path.join(where, f"{name}-{node}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)


def fail_at_step() -> int:
    """The training step at which FAIL_AT_STEP_ENV makes tiger's last rank raise once; -1: never."""
    return int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
