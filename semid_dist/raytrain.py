"""The Ray Train machinery every trained model here shares (tiger's RQ-VAE, evaluate's retriever).

Driver side:
  use_gpu            CPU or GPUs, counted in the Ray cluster (not on the driver)
  prepare_run_dir    --resume continues a run's checkpoints, else they are cleared first
  torch_trainer      a TorchTrainer: DDP workers, run storage (local or s3://), max_failures
  progress_queue     a queue on the driver's node that rank 0 puts its progress records in
  ProgressLog        logs those records on the driver as they arrive
  fit                runs the trainer with its progress log; a failure becomes one line
                     (failures.py), and the result's last checkpoint is returned
Worker side:
  ddp                DistributedDataParallel without the per-forward buffer broadcast
  put_progress       hand a record to the driver; losing one never stops training
  report             every rank reports (a barrier); rank 0 attaches the checkpoint

Global batches (tiger/batches.py) and the collectives (tiger/collectives.py) are the other two
shared pieces; both are numpy/torch only and are imported from there.
"""

from __future__ import annotations

import inspect
import logging
import queue as pyqueue
import tempfile
import threading
from typing import Callable

import ray
import ray.train
import torch

from semid_dist.errors import UserError
from semid_dist.failures import TrainingError, dead_nodes, training_failed
from semid_dist.io import storage
from semid_dist.io.storage import Storage

log = logging.getLogger("semid_dist")


def use_gpu(device: str, num_workers: int, what: str) -> bool:
    """GPUs are counted in the Ray cluster, not on the driver: under `ray job submit` the driver
    often runs on a CPU-only head node while the workers land on GPU nodes."""
    if device == "cpu":
        return False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "cuda" and gpus < num_workers:
        raise UserError(
            f"--device cuda with --num_workers {num_workers}: the Ray cluster has "
            f"{gpus} GPU(s); each worker needs one"
        )
    if device == "auto" and 0 < gpus < num_workers:
        log.warning(
            "%s: %d GPU(s) for %d workers; training on CPU (lower --num_workers to use the GPUs)",
            what,
            gpus,
            num_workers,
        )
    return gpus >= num_workers


def prepare_run_dir(run_dir: str, store: Storage, resume: bool, what: str) -> None:
    """--resume keeps the run's checkpoints (Ray Train hands the latest to the workers); without
    it an earlier run in the same folder is removed first."""
    fs = store.fs(run_dir)
    path = storage.strip_scheme(run_dir)
    exists = fs.exists(path)
    if resume:
        if exists:
            log.info("%s: --resume: continuing the run in %s from its latest checkpoint", what, run_dir)
        else:
            log.warning("%s: --resume: no earlier run in %s; starting from scratch", what, run_dir)
    elif exists:
        log.info(
            "%s: starting afresh; removing the earlier run in %s (use --resume to continue it)", what, run_dir
        )
        fs.rm(path, recursive=True)


def torch_trainer(
    loop_fn: Callable[[dict], None],
    loop_cfg: dict,
    *,
    name: str,
    root: str,
    store: Storage,
    num_workers: int,
    gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    datasets: dict | None = None,
    dataset_config: ray.train.DataConfig | None = None,
):
    """A TorchTrainer that keeps every checkpoint of run `name` under root (local or s3://)."""
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
    is_s3 = storage.is_s3(root)
    return TorchTrainer(
        loop_fn,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.strip_scheme(root) if is_s3 else root,
            storage_filesystem=store.arrow_fs(root) if is_s3 else None,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        ),
        datasets=datasets or {},
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )


def progress_queue():
    """A queue on the driver's node: one on a node that is lost would lose every later line."""
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


class ProgressLog:
    """Log rank 0's records on the driver (the log file) as they arrive, with log_record."""

    def __init__(self, q, log_record: Callable[[dict], None]) -> None:
        self.q = q
        self.log_record = log_record
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="train-progress", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self._drain()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.log_record(self.q.get(timeout=0.5))
            except pyqueue.Empty:
                continue
            except Exception:  # the queue actor is gone: nothing more will arrive
                return

    def _drain(self) -> None:
        try:
            while not self.q.empty():
                self.log_record(self.q.get_nowait())
        except Exception:
            pass


def fit(trainer, progress, log_record: Callable[[dict], None], max_failures: int, run_dir: str, what: str):
    """trainer.fit() with rank 0's records logged as they come; returns the Result, which holds
    a checkpoint. A worker's UserError, a lost node or a crash past --max_failures raises one
    line (failures.training_failed)."""
    dead_before = dead_nodes()
    try:
        with ProgressLog(progress, log_record):
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise training_failed(e, max_failures, run_dir, dead_before, what) from None
    finally:
        progress.shutdown()
    if result.checkpoint is None:
        raise TrainingError(f"{what} training reported no checkpoint (run {run_dir})")
    return result


def put_progress(queue, record: dict) -> None:
    """Hand a record to the driver's log; losing a progress line never stops training."""
    if queue is None:
        return
    try:
        queue.put_nowait(record)
    except Exception:  # the driver went away or the queue is full: training goes on
        pass


def ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP without the per-forward buffer broadcast: tiger's codebooks are buffers kept
    identical by the all-reduced EMA statistics, and a broadcast from rank 0 would hide a
    missing all-reduce. torch >= 2.13 names the switch forward_sync_buffers."""
    DDP = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def report(metrics: dict, rank: int, save: Callable[[str], None], prefix: str = "ckpt-") -> None:
    """Every rank reports (report() is a barrier); rank 0 writes the checkpoint with save(dir)."""
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        save(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
