"""Quality metrics, computed the same way for every mode."""

from __future__ import annotations

import numpy as np

from semid_dist.math.dedup import row_groups
from semid_dist.math.quality import gini


def collision_stats(codes_NL: np.ndarray, sizes_G: np.ndarray | None = None) -> dict:
    """Collision rate = 1 - distinct tuples / N, and the largest group sharing a tuple (from
    the groups' sizes when the caller has them: math.dedup.suffix_dedup)."""
    n = codes_NL.shape[0]
    if n == 0:
        return {"collision_rate": 0.0, "max_bucket": 0, "distinct_ids": 0}
    counts = np.bincount(row_groups(codes_NL)[0]) if sizes_G is None else sizes_G
    return {
        "collision_rate": float(1.0 - len(counts) / n),
        "max_bucket": int(counts.max()),
        "distinct_ids": int(len(counts)),
    }


def level_stats(codes_NL: np.ndarray, n_codes: int) -> list[dict]:
    """Per level: codes used, perplexity exp(H) of the code distribution, dead codes, and the Gini
    coefficient of code usage over all n_codes codes (0: even; dead codes count as 0)."""
    out = []
    n = max(codes_NL.shape[0], 1)
    for level in range(codes_NL.shape[1]):
        counts = np.bincount(codes_NL[:, level], minlength=n_codes)
        p = counts[counts > 0] / n
        used = int((counts > 0).sum())
        out.append(
            {
                "level": level,
                "codes_used": used,
                "dead_codes": int(n_codes - used),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())) if used else 0.0,
                "gini": gini(counts),
            }
        )
    return out


def relative_reconstruction_error(sq_err_sum: float, sq_norm_sum: float) -> float:
    """sum ||x - x_hat||^2 / sum ||x||^2 (sums accumulated over the streaming pass)."""
    return float(sq_err_sum / sq_norm_sum) if sq_norm_sum > 0 else 0.0


def quality_report(
    codes_NL: np.ndarray,
    n_codes: int,
    sq_err_sum: float,
    sq_norm_sum: float,
    sizes_G: np.ndarray | None = None,
) -> dict:
    return {
        **collision_stats(codes_NL, sizes_G),
        "levels": level_stats(codes_NL, n_codes),
        "relative_reconstruction_error": relative_reconstruction_error(sq_err_sum, sq_norm_sum),
    }
