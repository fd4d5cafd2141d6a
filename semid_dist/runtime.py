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


def worker_setup() -> None:
    """First thing in every local Ray worker (worker_process_setup_hook): import pandas whole.
    Ray Data imports pandas from threads of a worker; a worker that first imported it that way
    once saw a half-initialised module ("module 'pandas' has no attribute 'core'")."""
    import pandas  # noqa: F401


# For a Ray this process starts (and the test suite's): see worker_setup.
LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "semid_dist.runtime.worker_setup"}


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster named by --ray_address / RAY_ADDRESS, else start a local Ray.

    Locally we advertise at least 4 logical CPUs: on a 2-core machine, train workers holding
    whole CPUs would leave Ray Data no slot and the job hangs silently (DESIGN.md section 6).
    """
    if cfg.log_level != "DEBUG":  # before ray.data is imported: it configures logging then
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG",
                              os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml"))
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
        ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=cfg.log_level == "DEBUG",
                 configure_logging=False, runtime_env=LOCAL_RUNTIME_ENV)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.preserve_order = True  # --max_items keeps the first rows, stably


def torch_device(cfg: Config) -> str:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        from semid_dist.errors import UserError

        raise UserError("--device cuda: no CUDA GPU is visible to torch")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device
