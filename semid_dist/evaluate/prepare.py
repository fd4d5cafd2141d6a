"""What ``semid evaluate`` reads and hands to the workers: the runs' IDs, the variants to train
(every run, and the baselines built from them), and each protocol's windows and queries.

Item rows: every array here indexes items by their row in the first run's ItemIDs, sorted
ascending. Every run must map exactly the same ItemIDs, so that a hit means the same item for
every run and baseline.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semid_dist.catalog.names import ids_kind
from semid_dist.config import CODES_FIELD
from semid_dist.errors import UserError
from semid_dist.evaluate.config import EvalConfig
from semid_dist.evaluate.steps import Queries, Windows
from semid_dist.io.storage import Storage
from semid_dist.math import histories as H
from semid_dist.pipeline.collisions import CollisionSummary
from semid_dist.published import read_mappings, read_results, resolve_run

log = logging.getLogger("semid_dist")

SHUFFLE_SEED = 20230516  # the shuffled baseline's permutation: fixed, so reruns compare alike


@dataclass
class RunIDs:
    name: str  # how the figures name it
    path: str  # the published output dir
    ids_N: np.ndarray | pa.Array  # ItemIDs, ascending (catalog.names.sorted_ids)
    sid_NM: np.ndarray  # int64 IDs (L codes, then the dedup code), row i is ids_N[i]'s
    results: dict  # its training_results.json

    def proxies(self) -> dict:
        m = self.results.get("metrics") or {}
        coh = m.get("coherence") or {}
        pol = CollisionSummary.read(self.results)  # None: a run from before the record (suffix)
        error = m.get("relative_reconstruction_error")
        if pol and pol.error_after is not None:
            error = pol.error_after
        return {
            "mode": self.results.get("mode"),
            "id_shape": f"{self.sid_NM.shape[1] - 1} x {_codes(self.results)} + dedup",
            "collision_policy": pol.policy if pol else "suffix",
            "collision_rate": m.get("collision_rate"),
            "collision_rate_after_policy": pol.rate_after if pol else m.get("collision_rate"),
            "relative_reconstruction_error": error,
            "coherence_knn_same_first": coh.get("knn_same_first"),
            "coherence_knn_same_first_two": coh.get("knn_same_first_two"),
        }


def _codes(results: dict):
    c = results.get("config") or {}
    return c.get(CODES_FIELD.get(results.get("mode"), "n_clusters"))


def load_runs(paths: list[str], store: Storage) -> list[RunIDs]:
    runs = []
    for p in paths:
        run_dir, title = resolve_run(p, store)
        results = read_results(run_dir, store)
        ids_N, sid_NM = read_mappings(run_dir, store)
        runs.append(RunIDs(title, run_dir, ids_N, sid_NM, results))
    first = runs[0]
    for r in runs[1:]:
        if not _same_ids(r.ids_N, first.ids_N):
            kinds = ("", "")
            if ids_kind(r.ids_N) != ids_kind(first.ids_N):
                kinds = (f" {ids_kind(r.ids_N)}", f" {ids_kind(first.ids_N)}")
            raise UserError(
                f"{r.name} maps {len(r.ids_N)}{kinds[0]} items and {first.name} {len(first.ids_N)}"
                f"{kinds[1]}: runs compared side by side must map the same ItemIDs"
            )
    return runs


def _same_ids(a, b) -> bool:
    if ids_kind(a) != ids_kind(b) or len(a) != len(b):
        return False
    return a.equals(b) if ids_kind(a) == "string" else bool(np.array_equal(a, b))


def variants(cfg: EvalConfig, runs: list[RunIDs]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The ID table of every model to train, by name, and a description of each variant
    (popularity needs no model and is described here too)."""
    tables, described = {}, []
    for i, r in enumerate(runs):
        name = f"run{i + 1}"
        tables[name] = r.sid_NM
        described.append({"name": name, "kind": "run", "run": r.name, "path": r.path, **r.proxies()})
    base = cfg.baseline_list
    if "shuffled" in base:
        for i, r in enumerate(runs if cfg.shuffled == "all" else runs[:1]):
            name = f"shuffled{i + 1}"
            perm = np.random.default_rng(SHUFFLE_SEED + i).permutation(len(r.sid_NM))
            tables[name] = r.sid_NM[perm]
            described.append(
                {"name": name, "kind": "shuffled", "run": r.name, "what": "its IDs shuffled across items"}
            )
    if "item_tokens" in base:
        tables["item_tokens"] = np.arange(len(runs[0].ids_N), dtype=np.int64)[:, None]
        described.append({"name": "item_tokens", "kind": "item_tokens", "what": "one token per item"})
    if "popularity" in base:
        described.append({"name": "popularity", "kind": "popularity", "what": "most-interacted unseen items"})
    return tables, described


def protocol_data(h: H.Histories, protocol: str, cfg: EvalConfig, n_items: int) -> dict:
    """The windows a model trains on, the validation and test queries, and the items' training
    counts (cold-item buckets, popularity) under one protocol."""
    split = H.make_split(h, protocol, cfg.test_last)
    items, target, keys = H.training_windows(h, split.train_len_U, cfg.max_history)
    n_users = len(h.users_U)
    val_user = np.arange(n_users, dtype=np.int64)
    return {
        "windows": Windows(items, target, keys),
        "val": queries(h, val_user, split.val_pos_U, cfg.max_history),
        "test": queries(h, split.test_user_Q, split.test_pos_Q, cfg.max_history),
        "test_user_Q": split.test_user_Q,
        "train_counts_N": H.train_counts(h, split.train_len_U, n_items),
    }


def queries(h: H.Histories, user_Q: np.ndarray, pos_Q: np.ndarray, max_history: int) -> Queries:
    context, length = H.query_contexts(h, user_Q, pos_Q, max_history)
    offsets, seen = H.seen_items(h, user_Q, pos_Q)
    target = h.items_T[h.offsets_U1[user_Q] + pos_Q]
    return Queries(target, context, length, offsets, seen)


def digest(*arrays: np.ndarray) -> str:
    """A short hash of the data the models train on: part of the Ray Train run's name."""
    d = hashlib.sha1()
    for a in arrays:
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()[:16]
