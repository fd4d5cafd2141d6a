"""The hash sample: which rows it keeps and how many (numpy only).

The scan pass keeps the rows whose ItemID hashes below target / N (hash_unit): a binomial
count around the target, with a standard deviation below sqrt(target). Two bounds follow.
"""

from __future__ import annotations

import math

import numpy as np


def margin(target: int) -> int:
    """8 ceil(sqrt target) + 16 rows: more than 4.8 standard deviations of the sample's size
    around `target` (7 at 256), so a sample falls outside target +- margin(target) essentially
    never."""
    return 8 * (math.isqrt(max(target, 1) - 1) + 1) + 16


def sample_floor(k: int) -> int:
    """The fewest rows to aim for when a codebook of k codes is fitted on the sample: k plus the
    margin, so the sample falls short of k only beyond 4.8 standard deviations. Aiming for k
    itself is not enough: the sample's size is binomial around its target, so it falls short of
    k rows about half the time, and then the fit cannot start."""
    return k + margin(k)


def capacity(target: int) -> int:
    """Rows to make room for when collecting a sample aimed at `target`."""
    return target + margin(target)


FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3  # 64-bit FNV-1a


def utf8_keys(offsets_N1: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The 64-bit FNV-1a hash of each string's UTF-8 bytes (string i is data[offsets[i]:
    offsets[i + 1]]), as int64: what a string ItemID is in every rule that hashes an ItemID (the
    samples, tiger's validation split and batches). A function of the bytes alone, the same on
    every machine and Python version. Vectorised over the strings, one step per byte position."""
    starts = np.asarray(offsets_N1[:-1], np.int64)
    lengths = np.diff(np.asarray(offsets_N1, np.int64))
    by_len = np.argsort(-lengths, kind="stable")  # the strings still going form a prefix
    starts, lengths = starts[by_len], lengths[by_len]
    h = np.full(len(starts), FNV_OFFSET, np.uint64)
    neg = -lengths  # ascending
    data = np.asarray(data, np.uint8)
    with np.errstate(over="ignore"):
        for j in range(int(lengths[0]) if len(lengths) else 0):
            live = int(np.searchsorted(neg, -j, side="left"))  # the strings longer than j
            h[:live] = (h[:live] ^ data[starts[:live] + j].astype(np.uint64)) * np.uint64(FNV_PRIME)
    out = np.empty_like(h)
    out[by_len] = h
    return out.view(np.int64)


def hash_unit(ids_N: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per ItemID (splitmix64): a sample drawn with it is a function
    of the ItemIDs and the seed alone, never of row order or sharding. ids_N: integer ItemIDs as
    they are, string ItemIDs as their utf8_keys."""
    with np.errstate(over="ignore"):
        z = ids_N.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)
