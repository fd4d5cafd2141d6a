"""The Ray Train worker loop of ``semid evaluate`` (runs on every rank; reads top to bottom).

data  <- the driver's arrays (windows and queries per protocol, IDs per variant), from the
         object store
done  <- the tasks the latest checkpoint already holds (a restart, or --resume)
for each task (variant, protocol, seed) not done:
    train epochs in global batches (steps.py); validation Recall@10 after each; early stop
    the best epoch's weights rank the test targets; rank 0 reports a checkpoint holding
    every finished task's ranks, so a failure costs at most the task in progress
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from semid_dist import raytrain
from semid_dist.evaluate import steps
from semid_dist.evaluate.config import EvalConfig
from semid_dist.math.prefix_beam import PrefixTree
from semid_dist.math.retriever import Retriever
from semid_dist.tiger.collectives import Collectives

STATE_FILE = "evaluate_state.pt"


def train_loop_per_worker(loop_cfg: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    cfg = EvalConfig.from_dict(loop_cfg["config"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if loop_cfg["use_gpu"] else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1)))
    comm = Collectives(device)
    data = ray.get(loop_cfg["data"])
    queue = loop_cfg.get("progress")

    done: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            done = load(d)["done"]
        if comm.rank == 0:
            raytrain.put_progress(queue, {"resumed": len(done)})
    tasks = loop_cfg["tasks"]
    reported = False
    for i, task in enumerate(tasks[len(done) :], start=len(done)):
        result = run_task(cfg, task, data, device, comm, lambda r, i=i: _progress(queue, comm, i, tasks, r))
        done.append(result)
        raytrain.report(
            {"tasks_done": len(done)}, comm.rank, lambda d: save(d, done), prefix="evaluate-ckpt-"
        )
        reported = True
    if not reported:  # nothing to train, or a resumed run that had finished: hand the results over
        raytrain.report(
            {"tasks_done": len(done)}, comm.rank, lambda d: save(d, done), prefix="evaluate-ckpt-"
        )


def run_task(cfg: EvalConfig, task: dict, data: dict, device, comm: Collectives, progress) -> dict:
    """Train one model for (variant, protocol, seed) and rank its test targets."""
    sid_np = data["variants"][task["variant"]]
    proto = data["protocols"][task["protocol"]]
    sid_NM = torch.from_numpy(sid_np).to(device)
    tree = PrefixTree.build(sid_np).to(device)
    torch.manual_seed(task["seed"])  # identical initial weights on every rank
    model = Retriever(
        vocab_sizes=tree.vocab_sizes,
        max_history=cfg.max_history,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    history, best, best_state, bad = [], -1.0, None, 0
    t_task = time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss = steps.train_epoch(
            model, opt, sid_NM, proto["windows"], epoch, task["seed"], cfg.batch_size, comm
        )
        val_rank = steps.ranks_on_rank(model, sid_NM, tree, proto["val"], cfg.beam_size, cfg.keep_seen, comm)
        val_r10 = float(np.mean((val_rank >= 1) & (val_rank <= 10))) if len(val_rank) else 0.0
        record = {
            "epoch": epoch + 1,
            "loss": loss,
            "val_recall@10": val_r10,
            "time_s": time.perf_counter() - t0,
        }
        history.append(record)
        progress(record)
        if val_r10 > best:
            best, bad = val_r10, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    test_rank = steps.ranks_on_rank(model, sid_NM, tree, proto["test"], cfg.beam_size, cfg.keep_seen, comm)
    best_epoch = max(history, key=lambda r: (r["val_recall@10"], -r["epoch"]))["epoch"]
    return {
        **task,
        "test_rank": torch.from_numpy(test_rank.astype(np.int32)),
        "history": history,
        "best_epoch": best_epoch,
        "best_val_recall@10": best,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - t_task, 3),
    }


def _progress(queue, comm: Collectives, i: int, tasks: list[dict], record: dict) -> None:
    if comm.rank == 0:
        raytrain.put_progress(queue, {**record, "task": i + 1, "tasks": len(tasks), **tasks[i]})


def save(directory: str, done: list[dict]) -> None:
    """Tensors, numbers, strings, lists and dicts only: loadable with weights_only=True."""
    torch.save({"done": done}, os.path.join(directory, STATE_FILE))


def load(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
