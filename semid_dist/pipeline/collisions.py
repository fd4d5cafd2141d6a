"""The collision policy applied to the encode pass's codes, and its one typed summary.

``CollisionSummary`` is what every command records as ``metrics.collisions`` in
training_results.json (train and encode through ``apply_policy``, nightly through
``CollisionSummary.of_generation``) and what every reader gets back with ``CollisionSummary.read``
(the report, the run summary, ``semid evaluate``'s proxies). Runs written before the record
existed have none: ``read`` returns None for them, and each reader says what it shows then.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from semid_dist.math.dedup import suffix_dedup
from semid_dist.math.metrics import collision_stats

if TYPE_CHECKING:  # readers of the record (the report) import this module without Ray
    from semid_dist.catalog.encode import EncodeResult
    from semid_dist.config import Config
    from semid_dist.pipeline.relocation import CandidateSpool

log = logging.getLogger("semid_dist")


@dataclass(frozen=True)
class CollisionSummary:
    """What the collision policy did. The optional fields are absent from the JSON when unset
    (nightly records no errors or timing; only relocate has candidates)."""

    policy: str  # suffix | relocate
    candidates: int | None = None  # last-level candidates per item (relocate)
    rate_before: float = 0.0  # collision rate of the tokenizer's codes
    rate_after: float = 0.0  # of the published codes (without the dedup code)
    moved: int = 0  # items whose published codes differ from their encoded ones
    suffix_items: int = 0  # items whose dedup code is > 0
    error_before: float | None = None  # relative reconstruction error of the encoded codes
    error_after: float | None = None  # of the published codes
    seconds: float | None = None  # the policy's wall time
    tasks: int | None = None  # Ray tasks that relocated, a bucket of prefixes each (relocate)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def read(cls, results: dict) -> CollisionSummary | None:
        """The summary a run recorded, or None for a run written before the record existed."""
        d = (results.get("metrics") or {}).get("collisions")
        if not d:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def of_generation(
        cls,
        policy: str,
        encoded_NL: np.ndarray,
        sid_NM: np.ndarray,
        fresh_N: np.ndarray,
        rate_before: float,
        rate_after: float,
    ) -> CollisionSummary:
        """A nightly generation: kept IDs keep their codes, so only fresh IDs count as moved."""
        codes_NL = sid_NM[:, :-1]
        return cls(
            policy=policy,
            rate_before=rate_before,
            rate_after=rate_after,
            moved=int((fresh_N & (codes_NL != encoded_NL).any(axis=1)).sum()),
            suffix_items=int((sid_NM[:, -1] > 0).sum()),
        )


def apply_policy(
    cfg: Config, enc: EncodeResult, spool: CandidateSpool | None = None
) -> tuple[np.ndarray, np.ndarray, CollisionSummary, np.ndarray | None]:
    """The codes and dedup codes of every item under --collision_policy, what the policy did,
    and under suffix the sizes of the groups. relocate: spool took the encode pass's candidates
    (pipeline/relocation.py)."""
    t0 = time.perf_counter()
    n = len(enc.ids_N)
    err_before = enc.sq_err_sum / enc.sq_norm_sum if enc.sq_norm_sum > 0 else 0.0
    if cfg.collision_policy == "suffix":
        dedup_N, sizes_G = suffix_dedup(enc.codes_NL)  # ids_N is sorted: one sort does it all
        rate = 1.0 - len(sizes_G) / n if n else 0.0
        summary = CollisionSummary(
            policy="suffix",
            rate_before=rate,
            rate_after=rate,
            moved=0,
            suffix_items=int(n - len(sizes_G)),
            error_before=err_before,
            error_after=err_before,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return enc.codes_NL, dedup_N, summary, sizes_G
    rate_before = collision_stats(enc.codes_NL)["collision_rate"]
    codes_NL, dedup_N, counts = spool.relocate(enc.codes_NL, enc.stream_order)
    enc.stream_order = None
    err_after = (enc.sq_err_sum + counts["err_delta"]) / enc.sq_norm_sum if enc.sq_norm_sum > 0 else 0.0
    summary = CollisionSummary(
        policy="relocate",
        candidates=spool.k,
        rate_before=rate_before,
        rate_after=collision_stats(codes_NL)["collision_rate"],
        moved=counts["moved"],
        suffix_items=counts["suffix_items"],
        error_before=err_before,
        error_after=float(err_after),
        seconds=round(time.perf_counter() - t0, 3),
        tasks=counts.get("tasks"),
    )
    return codes_NL, dedup_N, summary, None


def log_policy(c: CollisionSummary) -> None:
    if c.policy == "suffix":
        log.info("collision policy suffix: %d items carry a dedup code > 0", c.suffix_items)
        return
    log.info(
        "collision policy relocate (%d candidates): collision rate %.3f%% -> %.3f%%, %d items moved, "
        "%d still need a suffix, relative reconstruction error %.4f -> %.4f, %.2f s%s",
        c.candidates,
        100 * c.rate_before,
        100 * c.rate_after,
        c.moved,
        c.suffix_items,
        c.error_before,
        c.error_after,
        c.seconds,
        f" in {c.tasks} Ray task(s)" if c.tasks else "",
    )
