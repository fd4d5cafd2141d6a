"""Driver side of TIGER mode: one Ray Train TorchTrainer run. The mode's fit (modes/tiger.py)
calls it and turns its result into the outputs a user reads.

    train(cfg, ds, input_dim, n_items, store) -> TrainRun

Where the run lives: ``--storage_path`` (default ``<output_dir>/.ray_train``, hidden next to the
published files; local or s3://) / ``tiger-<hash>``, the hash taking every config field that
changes what is trained but not how long or on how many workers. So ``--resume`` (possibly
with more ``--epochs`` or another ``--num_workers``) finds the run, and Ray Train hands its
latest checkpoint to the workers; a run without ``--resume`` clears that folder first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import ray.train

from semid_dist import raytrain
from semid_dist.catalog import plumbing
from semid_dist.config import Config
from semid_dist.io import storage
from semid_dist.io.storage import Storage
from semid_dist.math.rqvae import RQVAE
from semid_dist.options import hyperparameters, run_fields
from semid_dist.tiger import checkpoint, steps
from semid_dist.tiger.progress import log_record
from semid_dist.tiger.sample import TrainSample
from semid_dist.tiger.worker import RESTART_EVERY, train_loop_per_worker

log = logging.getLogger("semid_dist")

# The fields that define what a run trains, and so its checkpoint folder: those declared with
# defines_run=True in semid_dist/config.py. Left out on purpose (how long, where, what is
# published): epochs, patience, eval_every, keep_model, save_every, num_workers, cpus_per_worker,
# device, max_failures, resume.
RUN_FIELDS = run_fields(Config)
# training_results.json's hyperparameters block: the fields declared with hyperparameter=N, in order.
HYPERPARAMETERS = hyperparameters(Config)


@dataclass
class TrainRun:
    model: RQVAE
    model_args: dict
    loop: checkpoint.LoopState
    checkpoints: list[tuple[int, Any]]  # (epoch, ray.train.Checkpoint), by epoch
    run_dir: str
    fit_info: dict
    kept: dict | None = None  # the state dict of the evaluation epoch loop.kept_epoch

    def kept_model(self) -> RQVAE:
        """The model --keep_model best publishes: the kept epoch's (the last when none was)."""
        if not self.kept:
            return self.model
        model = RQVAE(**self.model_args)
        model.load_state_dict(self.kept)
        return model


def run_name(cfg: Config, input_dim: int, n_items: int, sample_fraction: float = 1.0) -> str:
    key = {f: getattr(cfg, f) for f in RUN_FIELDS}
    key.update(input_dim=int(input_dim), n_items=int(n_items))
    if sample_fraction < 1.0:  # trained on a hash sample (tiger/sample.py): another run
        key["train_sample"] = float(sample_fraction)
    return "tiger-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def storage_root(cfg: Config) -> str:
    """Where Ray Train keeps runs: --storage_path, else <output_dir>/.ray_train."""
    base = cfg.storage_path or storage.join(cfg.output_dir, ".ray_train")
    return base if storage.is_s3(base) else os.path.abspath(base)


def train(
    cfg: Config,
    ds,
    input_dim: int,
    n_items: int,
    store: Storage,
    trace_dir: str | None = None,
    fail_at_step: int = -1,
    sample: TrainSample | None = None,
) -> TrainRun:
    """Run the TorchTrainer; return the trained model, its history and checkpoints. sample:
    what the workers keep of the catalog (tiger/sample.py; None: every item). trace_dir and
    fail_at_step are test hooks (worker._Hooks)."""
    sample = sample or TrainSample(1.0, n_items, 0.0, "every item")
    use_gpu = raytrain.use_gpu(cfg.device, cfg.num_workers, "tiger")
    device = "cuda" if use_gpu else "cpu"
    root = storage_root(cfg)
    name = run_name(cfg, input_dim, n_items, sample.fraction)
    run_dir = storage.join(root, name)
    raytrain.prepare_run_dir(run_dir, store, cfg.resume, "tiger")
    args = steps.model_args(cfg, input_dim)
    arch = RQVAE(**args)
    log.info("tiger: model (%d parameters):\n%s", sum(p.numel() for p in arch.parameters()), arch)
    progress = raytrain.progress_queue()
    loop_cfg = {
        "config": cfg.to_dict(),
        "model_args": args,
        "use_gpu": use_gpu,
        "run_dir": run_dir,
        "progress": progress,
        "trace_dir": trace_dir,
        "fail_at_step": fail_at_step,
        "store": store,
        "expect_rows": -(-sample.expect_rows // max(cfg.num_workers, 1)),  # a shard's size, about
        "n_items": sample.expect_rows,  # what the workers hold (the intake's memory check)
        "sample_fraction": sample.fraction,
    }
    trainer = _torch_trainer(cfg, loop_cfg, name, root, ds, store)
    log.info(
        "tiger: Ray Train, %d worker(s) on %s (%s), run %s",
        cfg.num_workers,
        device,
        "nccl" if use_gpu else "gloo",
        run_dir,
    )
    result = raytrain.fit(trainer, progress, log_record, cfg.max_failures, run_dir, "tiger")
    run = _train_run(cfg, result, run_dir, use_gpu)
    run.fit_info["train_sample"] = sample.record()
    return run


def _train_run(cfg: Config, result, run_dir: str, use_gpu: bool) -> TrainRun:
    """The run's outcome read back from its last checkpoint: the model, the loop's state, one
    checkpoint per epoch, and the fit's record for training_results.json."""
    with result.checkpoint.as_directory() as d:
        saved = checkpoint.load(d)
    model = RQVAE(**saved["model_args"])
    model.load_state_dict(saved["model"])
    loop = checkpoint.loop_state(saved)
    by_epoch = sorted(
        ((int(m.get("epoch", 0)), c) for c, m in (result.best_checkpoints or [])), key=lambda ec: ec[0]
    )
    ckpts = list({e: c for e, c in by_epoch if e > 0}.items())  # one per epoch (a re-report wins)
    info = {
        "trainer": "ray.train.torch.TorchTrainer (DDP)",
        "backend": "nccl" if use_gpu else "gloo",
        "device": "cuda" if use_gpu else "cpu",
        "num_workers": cfg.num_workers,
        "run_dir": run_dir,
        "epochs_run": loop.epoch,
        "steps": loop.step,
        "stopped_early": loop.stopped_early,
        "best_val_recon": None if loop.best_val == float("inf") else loop.best_val,
        "model_args": saved["model_args"],
        "model_architecture": str(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "hyperparameters": {k: getattr(cfg, k) for k in HYPERPARAMETERS},
        "optimizer": "AdamW",
        "restart_every_steps": RESTART_EVERY,
        "history": loop.history,
    }
    return TrainRun(
        model=model,
        model_args=saved["model_args"],
        loop=loop,
        checkpoints=ckpts,
        run_dir=run_dir,
        fit_info=info,
        kept=saved.get("kept_model") or None,
    )


def _torch_trainer(cfg: Config, loop_cfg: dict, name: str, root: str, ds, store: Storage):
    return raytrain.torch_trainer(
        train_loop_per_worker,
        loop_cfg,
        name=name,
        root=root,
        store=store,
        num_workers=cfg.num_workers,
        gpu=loop_cfg["use_gpu"],
        cpus_per_worker=cfg.cpus_per_worker,
        max_failures=cfg.max_failures,
        datasets={"train": ds},
        dataset_config=_EveryRowDataConfig(read_cpus(cfg)),
    )


def read_cpus(cfg: Config) -> int:
    """CPUs for the read tasks that feed the workers: the cores plumbing.parallelism() counts,
    less one per train worker, which copies its rows in on one thread while the blocks arrive.
    Without a limit a local Ray (more logical CPUs than cores) runs more read tasks than there
    are spare cores: the worker falls behind and copies the backlog alone afterwards, and the
    intake takes longer (BENCHMARKS.md)."""
    return max(1, plumbing.parallelism() - cfg.num_workers)


class _EveryRowDataConfig(ray.train.DataConfig):
    """Ray Train's default DataConfig splits with equal=True, which drops up to world-1 rows;
    our global batches (batches.py) keep ranks in step however uneven the shards, so split
    without dropping anything. Ray Data's reads run on at most read_cpus CPUs (read_cpus())."""

    def __init__(self, read_cpus: int) -> None:
        super().__init__()
        self.read_cpus = read_cpus

    def ingest(self, ds):
        """A copy of ds with Ray Train's ingest options and the read CPU limit. A deep copy:
        a plain Dataset.copy shares the DataContext, so the caller's dataset would change too."""
        ds = ds.copy(ds, _deep_copy=True)
        ds.context.execution_options = self.default_ingest_options()
        opts = ds.context.execution_options
        opts.resource_limits = opts.resource_limits.copy(cpu=self.read_cpus)
        return ds

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        out: list[dict] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            splits = self.ingest(ds).streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for i, split in enumerate(splits):
                out[i][name] = split
        return out
