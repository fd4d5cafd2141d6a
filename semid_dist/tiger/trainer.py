"""Driver side of TIGER mode: one Ray Train TorchTrainer run, then the outputs a user reads.

    fit(job: modes.FitJob) -> (Tokenizer, fit_info)

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

import numpy as np
import ray.train

from semid_dist import export, raytrain, storage
from semid_dist.catalog import plumbing
from semid_dist.catalog.source import training_dataset
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.rqvae import RQVAE
from semid_dist.storage import Storage
from semid_dist.tiger import batches, checkpoint, plots, steps
from semid_dist.tiger.progress import log_record
from semid_dist.tiger.worker import RESTART_EVERY, train_loop_per_worker
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")

KEEP_RULE = (
    "the lowest validation relative reconstruction error among the evaluation epochs "
    "(--eval_every and the last), then the lower collision rate"
)
# Test hook: a worker raises once at this global step (tests of restarts; never set by users).
FAIL_AT_STEP_ENV = "SEMID_DIST_TEST_FAIL_AT_STEP"

# Fields that define what a run trains (and so its checkpoint folder). Left out on purpose:
# epochs, patience, save_every, num_workers, cpus_per_worker, device, max_failures, resume.
RUN_FIELDS = (
    "data_path",
    "max_items",
    "n_layers",
    "n_embed",
    "latent_dim",
    "batch_size",
    "learning_rate",
    "use_ema",
    "beta",
    "ema_decay",
    "dead_code_threshold",
    "gumbel",
    "gumbel_temperature",
    "gumbel_temperature_min",
    "val_fraction",
    "seed",
    "max_iters",
    "kmeans_progressive",
)
HYPERPARAMETERS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "n_layers",
    "n_embed",
    "latent_dim",
    "use_ema",
    "beta",
    "ema_decay",
    "dead_code_threshold",
    "gumbel",
    "gumbel_temperature",
    "gumbel_temperature_min",
    "patience",
    "val_fraction",
    "seed",
    "max_iters",
    "num_workers",
)


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


def fit(job) -> tuple[Tokenizer, dict]:
    """The tiger mode's fit (job: modes.FitJob): train on every item of the catalog; write
    checkpoint_epoch_*.pt and the plots next to the outputs."""
    cfg, scan, pub = job.cfg, job.scan, job.pub
    n_train = int((~batches.validation_mask(scan.ids_N, cfg.seed, cfg.val_fraction)).sum())
    if n_train < cfg.n_embed:
        raise UserError(
            f"--n_embed {cfg.n_embed} is larger than the number of training items "
            f"({n_train} after holding out --val_fraction {cfg.val_fraction})"
        )
    if cfg.learning_rate > steps.ADAMW_LR_WARN:
        log.warning(
            "tiger: --learning_rate %g is far above what AdamW tolerates (about 1e-3); 0.4, TIGER's "
            "rate, is meant for Adagrad: expect the loss to diverge",
            cfg.learning_rate,
        )
    ds = training_dataset(job.catalog, job.n_items, plumbing.read_tasks())
    fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
    run = train(cfg, ds, job.catalog.dim, job.n_items, job.catalog.store, fail_at_step=fail_at_step)
    for epoch, ckpt in run.checkpoints:
        with ckpt.as_directory() as d:
            export.write_torch(
                pub, f"checkpoint_epoch_{epoch}.pt", checkpoint.seed_payload(checkpoint.load(d))
            )
    if run.loop.history:
        with pub.open(plots.CURVES, "wb") as f:
            f.write(plots.training_curves(run.loop.history))
        with pub.open(plots.USAGE, "wb") as f:
            f.write(plots.code_usage(np.asarray(run.loop.usage_LK)))
        run.fit_info["plots"] = [plots.CURVES, plots.USAGE]
    run.fit_info["checkpoint_files"] = [f"checkpoint_epoch_{e}.pt" for e, _ in run.checkpoints]
    model = run.kept_model() if cfg.keep_model == "best" else run.model
    history = {r["epoch"]: r for r in run.loop.history}
    epoch = run.loop.kept_epoch if cfg.keep_model == "best" and run.kept else run.loop.epoch
    run.fit_info["kept_model"] = {
        "keep_model": cfg.keep_model,
        "epoch": epoch,
        "why": KEEP_RULE if cfg.keep_model == "best" and run.kept else "the last epoch (--keep_model last)",
        "val_rel_recon": history.get(epoch, {}).get("val_rel_recon"),
        "rel_recon": history.get(epoch, {}).get("rel_recon"),
        "collision_rate": history.get(epoch, {}).get("dup_rate"),
    }
    log.info("tiger: keeping the model of epoch %d (%s)", epoch, run.fit_info["kept_model"]["why"])
    tokenizer = Tokenizer("tiger", cfg.to_dict(), model=model.cpu(), model_args=run.model_args)
    return tokenizer, run.fit_info


def run_name(cfg: Config, input_dim: int, n_items: int) -> str:
    key = {f: getattr(cfg, f) for f in RUN_FIELDS}
    key.update(input_dim=int(input_dim), n_items=int(n_items))
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
) -> TrainRun:
    """Run the TorchTrainer; return the trained model, its history and checkpoints.
    trace_dir and fail_at_step are test hooks (worker._Hooks)."""
    use_gpu = raytrain.use_gpu(cfg.device, cfg.num_workers, "tiger")
    device = "cuda" if use_gpu else "cpu"
    root = storage_root(cfg)
    name = run_name(cfg, input_dim, n_items)
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
        "expect_rows": -(-n_items // max(cfg.num_workers, 1)),  # a shard's size, about
        "n_items": n_items,
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
        "device": device,
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
