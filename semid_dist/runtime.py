"""Process-level setup: logging (console + the seed's log file) and connecting to Ray."""

from __future__ import annotations

import logging
import os
import sys
import time

from semid_dist.config import Config

log = logging.getLogger("semid_dist")


def log_file_name(cfg: Config, timestamp: str) -> str:
    """The seed's naming: {timestamp}_{dataset}_{mode}_ep{epochs}_bs{batch_size}.log"""
    return f"{timestamp}_{cfg.dataset_name}_{cfg.mode}_ep{cfg.epochs}_bs{cfg.batch_size}.log"


def setup_logging(cfg: Config, log_dir: str) -> str:
    """Log to stderr and to logs/<seed name>; returns the log file path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, log_file_name(cfg, time.strftime("%Y%m%d_%H%M%S")))
    log.setLevel(getattr(logging, cfg.log_level))
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(fmt)
    log.addHandler(console)
    log.addHandler(to_file)
    log.propagate = False
    return path


def close_logging() -> None:
    for h in list(log.handlers):
        h.flush()
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


# Ray's own settings for a Ray this process starts (and the test suite's).
#
# Every worker imports pandas before it takes work (Ray's preload_python_modules, run on the
# worker's main thread at start-up): Ray Data imports pandas lazily, and a worker that first
# imported it from two threads at once once saw a half-initialised module ("module 'pandas'
# has no attribute 'core'", the race of ray-project/ray#32435). This used to be a
# worker_process_setup_hook, but any job runtime_env costs start-up time: the workers Ray
# prestarts for the first driver have no runtime_env, so none of them could be used and every
# task and Ray Data actor waited for a new worker started with it. The first catalog pass over
# 1M items (2 cores, a fresh Ray each time, runs alternated) took 11.7-14.2 s with a runtime_env
# (the hook, or only an env var) and 8.6-11.2 s without (BENCHMARKS.md).
LOCAL_SYSTEM_CONFIG = {"preload_python_modules": ["pandas"]}


# Ray Train settings for a Ray started on this machine, read by Ray Train's controller (Ray Train
# passes these variables from the driver's environment to it); a value already in the
# environment wins. The controller checks on its workers, and takes their reports, every
# health-check interval (2 s by default): a run waits for that poll to start, to take the last
# checkpoint and to finish. Its preemption watcher (one more actor process per run) watches
# for cluster nodes being drained, which a Ray on one machine never does. A 1-epoch tiger run
# over the embedded 3,200-item catalog (2 cores, runs alternated, BENCHMARKS.md): fit stage
# 30.0-39.5 s with Ray's defaults, 24.0-31.4 s with these (six runs each).
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
    whole CPUs would leave Ray Data no slot and the job hangs silently (DESIGN.md section 6).
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


def torch_device(cfg: Config) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        from semid_dist.errors import UserError

        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device
