"""The statistics pass of the streamed k-means fit: per-code residual sums over every item.

Each read unit (source.plan_units: consecutive files or row groups) is one Ray task that
streams its rows, encodes them with the current codebooks and keeps one RQStats (L x K x D
int64 sums, counts, squared error) however many rows it reads: memory O(block + L K D) per
task. The driver adds the tasks' statistics as they arrive, O(L K D) in all. The sums are exact
integers (math/rq_stats.py), so the result does not depend on which task read which rows, in
what order they finished, or on how many nodes ran them.

Plain Ray tasks rather than a Ray Data map: a map returns one result per block, and with
per-code sums of L x K x D that would push a codebook-sized array through the object store for
every few thousand rows. Tasks are spread over the cluster's nodes and retried on node loss.
"""

from __future__ import annotations

import logging

import numpy as np

from semid_dist import blas
from semid_dist.catalog import plumbing, source
from semid_dist.catalog.schema import Catalog, batch_to_arrays
from semid_dist.errors import UserError
from semid_dist.math.nearest import backend_for
from semid_dist.math.rq_stats import RQStats, Scales, accumulate

log = logging.getLogger("semid_dist")


def unit_stats(
    unit: source.Unit,
    fs,
    dim: int,
    codebooks_LKD: np.ndarray,
    scales: Scales,
    device: str = "cpu",
    beam: int = 1,
) -> RQStats:
    """One read unit's statistics (runs in a Ray task, holding a GPU when device is cuda; beam
    search assignments run on its CPU)."""
    blas.match_task()
    quantizer = backend_for(device if beam == 1 else "cpu").quantizer(codebooks_LKD, beam)
    stats = RQStats.zeros(codebooks_LKD.shape[0], codebooks_LKD.shape[1], dim)
    for block in source.read_unit(unit, fs):
        if source.ERROR_COL in block.column_names:
            raise UserError(block.column(source.ERROR_COL)[0].as_py())
        for batch in block.to_batches():
            _, x_BD = batch_to_arrays(batch, dim)
            accumulate(x_BD, codebooks_LKD, scales, stats, quantizer)
    return stats


def stats_pass(
    catalog: Catalog,
    n_items: int,
    codebooks_LKD: np.ndarray,
    scales: Scales,
    what: str,
    device: str = "cpu",
    beam: int = 1,
) -> RQStats:
    """The statistics of the first n_items rows under the given codebooks, from one task per
    read unit, at most plumbing.parallelism() of them running at once (one per GPU on cuda).
    On GPUs the assignment's float32 rounding differs from the CPU kernel's: a row near a tie
    between two codes may go the other way, nothing else differs."""
    import ray

    units = source.plan_units(catalog, n_items, plumbing.read_tasks())
    fs = catalog.store.arrow_fs(catalog.files[0])
    gpus = int(ray.cluster_resources().get("GPU", 0)) if device == "cuda" else 0
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, scheduling_strategy="SPREAD")(unit_stats)
    books_ref = ray.put(np.ascontiguousarray(codebooks_LKD, np.float32))
    total = RQStats.zeros(codebooks_LKD.shape[0], codebooks_LKD.shape[1], catalog.dim)
    todo, running, slots = list(units), {}, gpus or plumbing.parallelism()
    progress = plumbing.Progress(what, n_items)
    try:
        while todo or running:
            while todo and len(running) < slots:
                unit = todo.pop(0)
                running[task.remote(unit, fs, catalog.dim, books_ref, scales, device, beam)] = unit
            ready, _ = ray.wait(list(running), num_returns=1)
            unit = running.pop(ready[0])
            total.add(ray.get(ready[0]))
            progress.add(unit.rows)
    except Exception as e:
        for ref in running:
            ray.cancel(ref, force=True)
        plumbing.raise_for_user(e, catalog)
        raise
    return total
