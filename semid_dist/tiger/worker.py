"""The Ray Train worker loop for TIGER mode (runs on every rank; reads top to bottom).

    rows  <- this rank's Ray Data shard, read once into memory (sorted by ItemID)
    model <- the latest checkpoint, if any (resume / restart after a worker failure)
    init  <- k-means on rank 0, broadcast (skipped when the checkpoint already has codebooks)
    for each epoch: train in global batches (steps.py), evaluate (the validation split; every
                    item every --eval_every epochs and at the last), early-stop, report/checkpoint

Why the shard is kept in memory rather than streamed every epoch: an RQ-VAE trains for hundreds
of epochs over a catalog that fits in the workers' memory (1M x 768 float32 is 3 GB in all);
re-running the parquet read for every epoch would cost more than the epoch itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch

from semid_dist import raytrain, testhooks
from semid_dist.catalog.schema import batch_to_arrays
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.io import storage
from semid_dist.math.rqvae import RQVAE
from semid_dist.tiger import checkpoint, steps
from semid_dist.tiger import sample as train_sample
from semid_dist.tiger.collectives import Collectives

# Dead-code restarts are checked every this many optimizer steps: a restarted code then has
# this many batches to win assignments before it can be judged dead again.
RESTART_EVERY = 10


def train_loop_per_worker(loop_cfg: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.from_dict(loop_cfg["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if loop_cfg["use_gpu"] else torch.device("cpu")
    # Fractional CPUs let Ray Data run next to the workers, but torch would
    # still start one thread per core in every worker; split the node's cores between them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1)))
    comm = Collectives(device)
    assert comm.world == world and comm.rank == rank, (comm.world, world, comm.rank, rank)

    # 1. This rank's rows, streamed once through Ray Data; the epochs then run from memory.
    data, read_s = _intake(loop_cfg, cfg, comm, device, ctx.get_local_world_size())
    # 2. Model, optimizer and loop state, from the latest checkpoint when there is one.
    model, opt, state, kept = _model_and_state(loop_cfg, cfg, device, rank)
    net = raytrain.ddp(model, device) if comm.distributed else model

    # 3. Codebook initialisation (TIGER): k-means on the first batches' latents.
    t_init = time.perf_counter()
    steps.init_codebooks(model, data, cfg, comm)
    # Where this attempt's time went before its first epoch (rank 0), kept in that epoch's
    # record: the data-pipeline share of a run (bench/tiger_bench.py).
    startup = {"data_read_s": round(read_s, 3), "codebook_init_s": round(time.perf_counter() - t_init, 3)}

    # 4. Epochs.
    hooks = _Hooks(cfg, loop_cfg, model, rank, world)
    loop = steps.Loop(net, model, opt, data, cfg, comm, RESTART_EVERY, hooks)
    reported = False
    for epoch in range(state.epoch, cfg.epochs):
        if state.stopped_early:
            break
        t0 = time.perf_counter()
        model.temperature = steps.temperature(cfg, epoch) if cfg.gumbel else 1.0
        train_m, state.step = steps.train_epoch(loop, epoch, state.step)
        eval_m, usage_LK = evaluate_epoch(model, data, comm, cfg, state, epoch + 1)
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            **train_m,
            **eval_m,
            "lr": opt.param_groups[0]["lr"],
            "temperature": model.temperature if cfg.gumbel else None,
            "time_s": round(time.perf_counter() - t0, 3),
            **startup,
        }
        startup = {}
        diverged = steps.divergence(record)
        if diverged:
            raise UserError(diverged)
        state.epoch = epoch + 1
        if usage_LK is not None:
            state.usage_LK = usage_LK.tolist()
        state.history.append(record)
        score = steps.model_score(record)
        if score is not None and (not state.kept_score or list(score) < state.kept_score):
            state.kept_epoch, state.kept_score = record["epoch"], list(score)
            kept = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        hooks.end_epoch()
        if rank == 0:
            raytrain.put_progress(
                loop_cfg.get("progress"),
                {**record, "epochs": cfg.epochs, "stopped_early": state.stopped_early},
            )
        last = state.stopped_early or state.epoch == cfg.epochs
        if state.epoch % cfg.save_every == 0 or last:
            _report(model, opt, state, loop_cfg, rank, kept)
            reported = True
        testhooks.hold(f"tiger_epoch_{state.epoch}")  # a no-op unless a test holds the run here
    if not reported:  # resumed a finished run: hand the driver its final state again
        _report(model, opt, state, loop_cfg, rank, kept)


def _intake(loop_cfg: dict, cfg: Config, comm: Collectives, device, local_world: int):
    """This rank's rows in memory (steps.RankData) and the seconds the intake took. First a
    check that they fit: a worker that runs out of memory mid-intake dies without a word."""
    import ray.train

    dim = loop_cfg["model_args"]["input_dim"]
    check_shard_fits(loop_cfg.get("n_items", 0), dim, comm.world, local_world)
    t_read = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    keep = loop_cfg.get("sample_fraction", 1.0), cfg.seed
    ids_N, x_ND = read_shard(shard, dim, loop_cfg.get("expect_rows", 0), keep)
    data = steps.RankData.build(ids_N, x_ND, cfg, comm, device, consume=True)
    del ids_N, x_ND
    read_s = time.perf_counter() - t_read
    if comm.rank == 0:
        intake = {
            "rows": data.n_train + data.n_val,
            "rank_rows": len(data.ids_train_T) + len(data.ids_val_V),
            "workers": comm.world,
            "seconds": round(read_s, 3),
        }
        raytrain.put_progress(loop_cfg.get("progress"), {"intake": intake})
    return data, read_s


def _model_and_state(loop_cfg: dict, cfg: Config, device, rank: int):
    """(model, optimizer, loop state, the kept epoch's state dict or None): fresh, or from the
    latest checkpoint after a failure or with --resume."""
    import ray.train

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = RQVAE(**loop_cfg["model_args"])
    steps.init_weights(model)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    state = checkpoint.LoopState()
    kept: dict | None = None  # the state dict of the epoch --keep_model best keeps
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            saved = checkpoint.load(d)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = checkpoint.loop_state(saved)
        kept = saved.get("kept_model") or None
        if rank == 0:
            progress = {"resumed": {"epoch": state.epoch, "step": state.step}}
            raytrain.put_progress(loop_cfg.get("progress"), progress)
    return model, opt, state, kept


def check_shard_fits(n_items: int, dim: int, world: int, local_world: int) -> None:
    """Before the intake: this rank's shard (read_shard's array: float32 rows plus int64 ids)
    times the train workers on this node (local_world: Ray Train counts the workers that share
    the node's IP address) must fit the memory Ray gives the node (its `memory` resource: by
    default 70% of the node's RAM less the object store). A UserError otherwise,
    saying how many workers or how much memory the catalog needs."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    memory = float(node.get("Resources", {}).get("memory", 0))
    row_bytes = 4 * dim + 8
    need = local_world * -(-n_items // max(world, 1)) * row_bytes
    if memory <= 0 or need <= memory:
        return
    mb = lambda b: f"{b / 1e6:,.0f} MB" if b >= 1e7 else f"{b / 1e6:,.1f} MB"  # noqa: E731
    workers = -(-n_items * row_bytes * local_world // int(memory))
    raise UserError(
        f"tiger: the catalog ({n_items} items x {dim} dims) does not fit in the workers' memory: "
        f"{local_world} worker(s) on node {node.get('NodeManagerAddress', node_id)} need {mb(need)} for "
        f"their shards, and Ray gives that node {mb(memory)} (its `memory` resource); use "
        f"--num_workers {workers} or more, or nodes with at least {mb(need)} of memory"
    )


def read_shard(
    shard, dim: int, expect_rows: int = 0, sample: tuple[float, int] = (1.0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Stream this rank's shard once: (ItemID keys (N,), embeddings (N, dim)) in arrival order,
    only the rows of the hash sample (fraction, seed) when tiger trains on one (tiger/sample.py).

    Every row is copied once, from its Arrow chunk (a view into Ray's object store) straight
    into one array sized for expect_rows (grown by half when the shard is bigger: with
    streaming_split(equal=False) shards differ). The intake's cost is fresh memory, not
    copying (BENCHMARKS.md): one array for the shard instead of the blocks' copies plus a
    sorted one. A block is the read task's batches gathered into ~128 MB, one Arrow chunk per
    batch; each chunk is copied on its own, since joining a block's chunks first
    (batch_to_arrays on the whole block) would put the whole shard through fresh memory once
    more."""
    ids, rows, at = [], np.empty((max(int(expect_rows), 1), dim), np.float32), 0
    for block in shard.iter_batches(batch_format="pyarrow", batch_size=None):
        for batch in block.to_batches():  # zero-copy: one record batch per chunk
            ids_B, x_BD = batch_to_arrays(batch, dim)
            if sample[0] < 1.0:
                kept = train_sample.keep(ids_B, sample[1], sample[0])
                ids_B, x_BD = ids_B[kept], x_BD[kept]
            if at + len(x_BD) > rows.shape[0]:
                grown = np.empty((max(at + len(x_BD), rows.shape[0] * 3 // 2), dim), np.float32)
                grown[:at] = rows[:at]
                rows = grown
            rows[at : at + len(x_BD)] = x_BD
            ids.append(ids_B)
            at += len(x_BD)
    ids_N = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return ids_N, rows[:at]


def evaluate_epoch(
    model: RQVAE,
    data: steps.RankData,
    comm: Collectives,
    cfg: Config,
    state: checkpoint.LoopState,
    epochs_done: int,
) -> tuple[dict, np.ndarray | None]:
    """The end of an epoch: the validation error, early stopping on it, and the metrics over
    all items when the schedule says so (steps.catalog_eval_due) or when this epoch turns out to
    be the last because training stops early."""
    catalog = steps.catalog_eval_due(epochs_done, cfg)
    eval_m, usage_LK = steps.evaluate(model, data, comm, catalog=catalog)
    _early_stopping(state, eval_m["val_recon"], cfg.patience)
    if state.stopped_early and not catalog:
        eval_m, usage_LK = steps.evaluate(model, data, comm)
    return eval_m, usage_LK


def _early_stopping(state: checkpoint.LoopState, val: float | None, patience: int) -> None:
    """Decided from all-reduced numbers, so every rank stops after the same epoch."""
    if val is None or patience == 0:
        return
    if val < state.best_val:
        state.best_val, state.bad_epochs = val, 0
    else:
        state.bad_epochs += 1
        state.stopped_early = state.bad_epochs >= patience


def _report(model, opt, state: checkpoint.LoopState, loop_cfg: dict, rank: int, kept: dict | None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (raytrain.report)."""
    metrics = {k: v for k, v in (state.history[-1] if state.history else {}).items()}
    metrics["stopped_early"] = state.stopped_early

    def save(d: str) -> None:
        checkpoint.save(d, model, opt, state, loop_cfg["model_args"], loop_cfg["config"], kept)

    raytrain.report(metrics, rank, save, prefix="tiger-ckpt-")


class _Hooks:
    """Test hooks: fail_at_step (one injected worker failure, testhooks.FAIL_AT_STEP_ENV) and
    per-step codebook digests (trace_dir)."""

    def __init__(self, cfg: Config, loop_cfg: dict, model: RQVAE, rank: int, world: int) -> None:
        self.cfg, self.model, self.rank, self.world = cfg, model, rank, world
        self.run_dir = loop_cfg["run_dir"]
        self.store = loop_cfg["store"]
        self.fail_at_step = loop_cfg.get("fail_at_step", -1)
        self.trace_dir = loop_cfg.get("trace_dir")
        self.trace: list[dict] = []

    def before_step(self, step: int) -> None:
        if step != self.fail_at_step or self.rank != self.world - 1:
            return
        fs = self.store.fs(self.run_dir)
        marker = storage.join(storage.strip_scheme(self.run_dir), f"fail_at_step_{step}.done")
        if fs.exists(marker):  # failed once already: this is the restarted worker group
            return
        with fs.open(marker, "w") as f:
            f.write(f"rank {self.rank} raised at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} (test hook)")

    def after_step(self, step: int) -> None:
        if self.trace_dir is None:
            return
        digest = lambda t: hashlib.sha1(t.detach().cpu().numpy().tobytes()).hexdigest()  # noqa: E731
        self.trace.append(
            {
                "step": step,
                "codebooks": digest(self.model.codebooks_LKH),
                "ema_count": digest(self.model.ema_count_LK),
                "ema_sum": digest(self.model.ema_sum_LKH),
            }
        )

    def end_epoch(self) -> None:
        if self.trace_dir is None or not self.trace:
            return
        with open(os.path.join(self.trace_dir, f"rank{self.rank}.jsonl"), "a") as f:
            f.writelines(json.dumps(t) + "\n" for t in self.trace)
        self.trace.clear()
