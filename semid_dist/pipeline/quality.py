"""The quality figures that need the items' codes after the collision policy: the group sizes
before and after it, and the semantic coherence of the published codes on the encode pass's
hash sample (``math/quality.py`` holds the arithmetic)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from semid_dist.catalog.encode import EncodeResult

log = logging.getLogger("semid_dist")


def background(fn, *args):
    """Run fn(*args) on a thread; returns a function that waits for it and re-raises its error.
    The quality figures are numpy and faiss, which release the GIL: on a thread they use the cores
    the export's formatting and writing (one core) leaves idle."""
    box: dict = {}

    def target():
        try:
            fn(*args)
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    t = threading.Thread(target=target, name="semid-quality", daemon=True)
    t.start()

    def wait() -> None:
        t.join()
        if "error" in box:
            raise box["error"]

    return wait


def add_quality(quality: dict, enc: EncodeResult, codes_NL: np.ndarray) -> None:
    """Group sizes before and after the collision policy, and the coherence of codes_NL."""
    add_group_sizes(quality, enc.codes_NL, codes_NL)
    add_coherence(quality, enc, codes_NL)


def add_group_sizes(
    quality: dict, before_NL: np.ndarray, after_NL: np.ndarray, sizes_G: np.ndarray | None = None
) -> None:
    from semid_dist.math.quality import group_size_histogram, histogram_of_sizes

    before = group_size_histogram(before_NL) if sizes_G is None else histogram_of_sizes(sizes_G)
    after = before if after_NL is before_NL else group_size_histogram(after_NL)
    quality["group_sizes"] = {"before": before, "after": after}


def add_coherence(quality: dict, enc: EncodeResult, codes_NL: np.ndarray) -> None:
    """The semantic coherence of the published codes on the encode pass's hash sample."""
    from semid_dist.math.quality import coherence

    t0 = time.perf_counter()
    if enc.sample_ids is not None and len(enc.sample_ids):
        rows = np.searchsorted(enc.ids_N, enc.sample_ids)
        quality["coherence"] = coherence(enc.sample_x, codes_NL[rows])
        c = quality["coherence"]
        if c["knn_same_first"] is not None:
            log.info(
                "semantic coherence (%d items, %d neighbours): %.1f%% share the first code (random "
                "pairs %.1f%%), %.1f%% the first two (random %.2f%%)",
                c["sample"],
                c["k"],
                100 * c["knn_same_first"],
                100 * c["random_same_first"],
                100 * c["knn_same_first_two"],
                100 * c["random_same_first_two"],
            )
    enc.sample_x = None  # up to 30 MB the driver no longer needs
    quality["coherence_seconds"] = round(time.perf_counter() - t0, 3)
