"""Which rows train, which validate, and which rows form global batch j of an epoch.

Everything here is a function of the ItemIDs and the seed alone (math.sampling.hash_unit), never of
row order, of how Ray Data split the rows, or of the number of workers. Rank r's part of global
batch j is simply its own rows whose batch index is j, so:

* every rank runs the same steps (batch j exists on every rank, possibly empty on some), which
  keeps DDP's collectives in lockstep however uneven the shards are;
* the union over ranks of step j's rows is the same set for 1 or N workers, which is what lets
  an N-worker run reproduce a 1-worker run within float tolerance (tests/test_tiger_train.py).

Batch sizes are binomial around n / n_batches (hash buckets, not exact slices): exact slices
would need every rank to see every key, buckets need nothing but a count per bucket.
"""

from __future__ import annotations

import math

import numpy as np

from semid_dist.math.sampling import hash_unit

VAL_SEED_OFFSET = 1  # the validation split: hash_unit(ItemID, seed + 1) < val_fraction
EPOCH_SEED_OFFSET = 1000  # epoch e shuffles with hash_unit(ItemID, seed + 1000 + e)


def validation_mask(ids_N: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    return hash_unit(ids_N, seed + VAL_SEED_OFFSET) < fraction


def num_batches(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def epoch_batch_index(ids_N: np.ndarray, seed: int, epoch: int, n_batches: int) -> np.ndarray:
    """Global batch (0..n_batches-1) of every row in this epoch: a fresh shuffle per epoch."""
    u_N = hash_unit(ids_N, seed + EPOCH_SEED_OFFSET + epoch)
    return np.minimum((u_N * n_batches).astype(np.int64), n_batches - 1)


def group_rows(batch_N: np.ndarray, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order that lists batch 0's rows, then batch 1's, ...; offsets_B1[j]:offsets_B1[j+1]
    slices batch j. Stable, so rows sorted by ItemID stay sorted inside a batch."""
    order_N = np.argsort(batch_N, kind="stable")
    offsets_B1 = np.zeros(n_batches + 1, dtype=np.int64)
    np.cumsum(np.bincount(batch_N, minlength=n_batches), out=offsets_B1[1:])
    return order_N, offsets_B1
