"""Connecting to Ray: a cluster named by --ray_address / RAY_ADDRESS, else a local Ray."""

from __future__ import annotations

import logging
import os
import sys

from semid_dist.config import Config

log = logging.getLogger("semid_dist")


# Ray's own settings for a Ray this process starts (and the test suite's).
#
# Every worker imports pandas before it takes work (Ray's preload_python_modules, run on the
# worker's main thread at start-up): Ray Data imports pandas lazily, and a worker that first
# imports it from two threads at once can see a half-initialised module (the race of
# ray-project/ray#32435). Not a worker_process_setup_hook: any job runtime_env means the
# workers Ray prestarts cannot be used and every first task waits for a new worker
# (BENCHMARKS.md).
LOCAL_SYSTEM_CONFIG = {"preload_python_modules": ["pandas"]}


# Ray Train settings for a Ray started on this machine, read by Ray Train's controller (Ray Train
# passes these variables from the driver's environment to it); a value already in the
# environment wins. The controller checks on its workers, and takes their reports, every
# health-check interval (2 s by default): a run waits for that poll to start, to take the last
# checkpoint and to finish, so a short run polls faster. Its preemption watcher (one more
# actor process per run) watches for cluster nodes being drained, which a Ray on one machine
# never does.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_ray_options() -> dict:
    """ray.init arguments shared by the local Ray of the CLI and of the test suite."""
    return {"include_dashboard": False, "configure_logging": False, "_system_config": LOCAL_SYSTEM_CONFIG}


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """Start a Ray on this machine as the CLI and the test suite do (local_ray_options and
    LOCAL_TRAIN_ENV); init_kwargs go to ray.init."""
    import ray

    for name, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    ray.init(num_cpus=num_cpus, **local_ray_options(), **init_kwargs)


# ensure_ray started the local Ray this process is connected to, without forwarding its logs
# (stop_local_ray shuts it down; otherwise Ray's own exit hook does).
_stop_at_end = False


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster named by --ray_address / RAY_ADDRESS, else start a local Ray.

    Locally we advertise at least 4 logical CPUs: on a 2-core machine, train workers holding
    whole CPUs would leave Ray Data no slot and the job would hang silently.
    """
    global _stop_at_end
    if cfg.log_level != "DEBUG":  # before ray.data is imported: it configures logging then
        os.environ.setdefault(
            "RAY_DATA_LOGGING_CONFIG", os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml")
        )
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    # Ray Data's parquet scanner reads 8 batches ahead by default; with 768-d list columns that
    # is hundreds of MB per read task (Ray's own advice for wide tensor columns is 1).
    os.environ.setdefault("RAY_DATA_ARROW_SCANNER_BATCH_READAHEAD", "1")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    # Workers inherit the driver's environment for AWS_* (credentials stay out of the config).
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=cfg.log_level == "DEBUG")
    else:
        ncpu = max(4, os.cpu_count() or 1)
        log.info("starting a local Ray (%d logical CPUs)", ncpu)
        start_local_ray(ncpu, log_to_driver=cfg.log_level == "DEBUG")
        _stop_at_end = cfg.log_level != "DEBUG"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.preserve_order = True  # --max_items keeps the first rows, stably


def stop_local_ray() -> None:
    """Shut down the Ray that ensure_ray started in this process, if it did; a Ray the caller
    started, or a cluster, is left alone. Ray's own exit hook would do it too, but first sleeps
    0.5 s so that forwarded worker logs finish printing; only --log_level DEBUG forwards them,
    and then the hook is left to do it."""
    global _stop_at_end
    if not _stop_at_end:
        return
    import ray

    _stop_at_end = False
    ray.shutdown()
