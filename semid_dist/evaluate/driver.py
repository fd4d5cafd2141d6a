"""Driver side of ``semid evaluate``'s training: one Ray Train run trains every model.

Every (variant, protocol, seed) is one task; the workers run the tasks in order inside one
TorchTrainer run (worker.py), so the cluster's start-up cost is paid once, and a checkpoint
after each task lets a restart (--max_failures) or --resume skip the finished ones. The run's
folder is ``--storage_path`` (default ``<output_dir>/.ray_train``) / ``evaluate-<hash>``, the hash
taking everything that changes what is trained (not the workers, the device or the logging).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import ray

from semid_dist import raytrain
from semid_dist.evaluate import worker
from semid_dist.evaluate.config import EvalConfig
from semid_dist.io import storage
from semid_dist.io.storage import Storage

log = logging.getLogger("semid_dist")

# Fields that do not change what is trained, so --resume finds the run whatever they are.
NOT_IN_RUN_NAME = (
    "num_workers",
    "cpus_per_worker",
    "device",
    "max_failures",
    "resume",
    "storage_path",
    "ray_address",
    "s3_endpoint_url",
    "s3_retry_budget_s",
    "log_level",
    "output_dir",
    "bootstrap",
)


def run_name(cfg: EvalConfig, data_digest: str) -> str:
    key = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_RUN_NAME}
    key["data"] = data_digest
    return "evaluate-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def storage_root(cfg: EvalConfig) -> str:
    base = cfg.storage_path or storage.join(cfg.output_dir, ".ray_train")
    return base if storage.is_s3(base) else os.path.abspath(base)


def train_all(cfg: EvalConfig, data: dict, tasks: list[dict], data_digest: str, store: Storage) -> dict:
    """Run every task; returns {"results": [one dict per task, in order], "info": {...}}."""
    gpu = raytrain.use_gpu(cfg.device, cfg.num_workers, "evaluate")
    root = storage_root(cfg)
    name = run_name(cfg, data_digest)
    run_dir = storage.join(root, name)
    raytrain.prepare_run_dir(run_dir, store, cfg.resume, "evaluate")
    progress = raytrain.progress_queue()
    loop_cfg = {
        "config": cfg.to_dict(),
        "data": ray.put(data),
        "tasks": tasks,
        "use_gpu": gpu,
        "progress": progress,
    }
    trainer = raytrain.torch_trainer(
        worker.train_loop_per_worker,
        loop_cfg,
        name=name,
        root=root,
        store=store,
        num_workers=cfg.num_workers,
        gpu=gpu,
        cpus_per_worker=cfg.cpus_per_worker,
        max_failures=cfg.max_failures,
    )
    log.info(
        "evaluate: %d model(s) to train on %d worker(s) (%s), run %s",
        len(tasks),
        cfg.num_workers,
        "cuda" if gpu else "cpu",
        run_dir,
    )
    result = raytrain.fit(trainer, progress, log_record, cfg.max_failures, run_dir, "evaluate")
    with result.checkpoint.as_directory() as d:
        done = worker.load(d)["done"]
    assert len(done) == len(tasks), (len(done), len(tasks))
    info = {
        "trainer": "ray.train.torch.TorchTrainer",
        "device": "cuda" if gpu else "cpu",
        "num_workers": cfg.num_workers,
        "run_dir": run_dir,
    }
    return {"results": done, "info": info}


def log_record(r: dict) -> None:
    if "resumed" in r:
        log.info("evaluate: resumed from a checkpoint holding %d trained model(s)", r["resumed"])
        return
    log.info(
        "evaluate [%d/%d] %s, %s, seed %d: epoch %d: loss %.4f | val Recall@10 %.4f | %.1f s",
        r["task"],
        r["tasks"],
        r["variant"],
        r["protocol"],
        r["seed"],
        r["epoch"],
        r["loss"],
        r["val_recall@10"],
        r["time_s"],
    )
