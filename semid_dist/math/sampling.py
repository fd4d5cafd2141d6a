"""How many rows a hash sample keeps (pure arithmetic).

The scan pass keeps the rows whose ItemID hashes below target / N (data.hash_unit): a binomial
count around the target, with a standard deviation below sqrt(target). Two bounds follow.
"""

from __future__ import annotations

import math


def margin(target: int) -> int:
    """8 ceil(sqrt target) + 16 rows: more than 4.8 standard deviations of the sample's size
    around `target` (7 at 256), so a sample falls outside target +- margin(target) essentially
    never."""
    return 8 * (math.isqrt(max(target, 1) - 1) + 1) + 16


def sample_floor(k: int) -> int:
    """The fewest rows to aim for when a codebook of k codes is fitted on the sample: k plus the
    margin, so the sample falls short of k only beyond 4.8 standard deviations. Aiming for k
    itself failed: --sample_per_centroid 1 with 3 x 256 on 3,200 items kept 221 rows with seed
    7, and the fit could not start."""
    return k + margin(k)


def capacity(target: int) -> int:
    """Rows to make room for when collecting a sample aimed at `target`."""
    return target + margin(target)
