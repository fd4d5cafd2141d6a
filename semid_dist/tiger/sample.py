"""What tiger trains on: the whole catalog, or a deterministic hash sample of it (--train_sample_gb).

The sample is the rule of kmeans's: the items whose ItemID hashes (math.sampling.hash_unit, with
--seed) below a fraction, so which items it holds does not depend on sharding, row order or the
number of workers. The read tasks keep only the sampled rows (``sample_rows``, fused with the
read), and each train worker checks them again as it reads its shard; the validation split
(--val_fraction) is then drawn from the sample, and the encode pass still encodes every item. The
resolved sample size is part of what defines a run (run_name): a --resume with another size starts
afresh.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from semid_dist.catalog.schema import ID_COL, batch_names, id_keys
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.sampling import hash_unit, margin

log = logging.getLogger("semid_dist")

HEADROOM = 0.8  # share of the workers' memory the sample may fill (the model, batches, Arrow)


@dataclass(frozen=True)
class TrainSample:
    fraction: float  # the share of the catalog's items kept; 1.0: every item
    expect_rows: int  # about how many rows the sample holds
    gb: float  # their size in memory (float32 rows plus int64 keys)
    why: str  # how the size was chosen

    @property
    def whole(self) -> bool:
        return self.fraction >= 1.0

    def record(self) -> dict:
        return asdict(self)


def row_bytes(dim: int) -> int:
    return 4 * dim + 8


def workers_memory(num_workers: int) -> float:
    """The bytes of the `memory` resource Ray gives the nodes the train workers can run on, as
    the workers' intake check counts it: the smallest node's, times the nodes they can spread
    over (a single machine: its memory)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    mems = [float(r.get("memory", 0)) for r in nodes if r.get("CPU", 0) > 0 and r.get("memory", 0) > 0]
    return min(mems) * min(len(mems), max(num_workers, 1)) if mems else 0.0


def resolve(cfg: Config, n_items: int, dim: int, memory: float | None = None) -> TrainSample:
    """The sample tiger trains on (module docstring). auto: the whole catalog when it fits the
    workers' memory, else the largest sample that fits, with one warning naming the flag."""
    whole = n_items * row_bytes(dim)
    if cfg.train_sample_gb == "auto":
        memory = workers_memory(cfg.num_workers) if memory is None else memory
        cap = HEADROOM * memory
        if memory <= 0 or whole <= cap:
            return TrainSample(1.0, n_items, round(whole / 1e9, 3), "auto: the whole catalog fits")
        sample = _sample(cap, n_items, dim, f"auto: {cap / 1e9:.2f} GB of the workers' memory")
        log.warning(
            "tiger: the catalog (%.2f GB as float32) does not fit the memory Ray gives the train "
            "workers (%.2f GB); training on a hash sample of %.2f GB (about %d items); "
            "--train_sample_gb sets its size",
            whole / 1e9,
            memory / 1e9,
            sample.gb,
            sample.expect_rows,
        )
        return sample
    cap = float(cfg.train_sample_gb) * 1e9
    if whole <= cap:
        return TrainSample(1.0, n_items, round(whole / 1e9, 3), "--train_sample_gb: the whole catalog fits")
    sample = _sample(cap, n_items, dim, f"--train_sample_gb {cfg.train_sample_gb}")
    log.info("tiger: training on a hash sample of %.2f GB (about %d items)", sample.gb, sample.expect_rows)
    return sample


def _sample(cap: float, n_items: int, dim: int, why: str) -> TrainSample:
    """The largest hash sample whose size stays under cap bytes: its row count is binomial, so
    the target leaves sampling.margin rows below the cap (4.8 standard deviations)."""
    most = math.floor(cap / row_bytes(dim))
    rows = most - margin(most)
    if rows < 2:
        raise UserError(f"tiger: a sample of {why} holds no items to train on; raise --train_sample_gb")
    return TrainSample(rows / n_items, rows, round(rows * row_bytes(dim) / 1e9, 3), why)


def keep(ids_N: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """The rows of the sample (all of them at fraction 1)."""
    if fraction >= 1.0:
        return np.ones(len(ids_N), bool)
    return hash_unit(ids_N, seed) < fraction


def sample_rows(block: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The rows of a read block that are in the sample, for a map fused with the read: the rest
    of the catalog then never enters the object store on its way to the workers. A block that
    reports an unreadable file, or holds a null ItemID, goes on whole: the worker reports it."""
    ids = block.column(ID_COL) if ID_COL in block.column_names else None
    if ids is None or ids.null_count or "error" in block.column_names:
        return block
    names = batch_names(block)
    keys = id_keys(names) if names is not None else ids.to_numpy().astype(np.int64, copy=False)
    return block.take(pa.array(np.flatnonzero(keep(keys, seed, fraction))))
