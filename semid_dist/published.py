"""Reading what earlier commands published: a RUN argument resolved to its output dir (a
published run as is, a nightly root through its LATEST generation), its results, its evaluation
and its mappings. ``semid report``, ``semid inspect`` and ``semid evaluate`` read runs through
here; nothing in this module imports torch or starts Ray."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pyarrow as pa

from semid_dist.catalog.names import ids_kind, positions, sorted_ids
from semid_dist.errors import UserError, one_line
from semid_dist.io.publish import SUCCESS
from semid_dist.io.retry import DEFAULT_RETRY_BUDGET_S
from semid_dist.io.storage import Storage, is_s3, join, strip_scheme

# the names semid_dist/export.py gives these files (a test checks); not imported from there, as
# export imports torch: seconds that `semid report` and `semid inspect --prefix` do not need
RESULTS, MAPPING_PARQUET, MODEL = "training_results.json", "semantic_id_mappings.parquet", "final_model.pt"
EVALUATION = "evaluation.json"  # what `semid evaluate` publishes (commands/evaluate.py)


def add_s3_flags(p: argparse.ArgumentParser) -> None:
    """The S3 flags of the commands that read published runs (report, inspect)."""
    p.add_argument("--s3_endpoint_url", default="", help="S3 endpoint override (default: AWS_ENDPOINT_URL)")
    p.add_argument(
        "--s3_retry_budget_s",
        type=float,
        default=DEFAULT_RETRY_BUDGET_S,
        help=f"seconds S3 errors are retried before the command stops (default: {DEFAULT_RETRY_BUDGET_S:g})",
    )


def storage(args: argparse.Namespace) -> Storage:
    return Storage.resolve(args.s3_endpoint_url, args.s3_retry_budget_s)


def resolve_run(run: str, store: Storage) -> tuple[str, str]:
    """(the published output dir, how to name it) for RUN: a published output dir as is, a nightly
    output root's LATEST generation. A missing or unpublished run is a UserError."""
    fs = store.fs(run)
    path = strip_scheme(run).rstrip("/")
    try:
        if fs.exists(join(path, SUCCESS)):
            return run.rstrip("/"), run
        if fs.exists(join(path, RESULTS)) or fs.exists(join(path, EVALUATION)):
            raise UserError(f"{run}: not published (no {SUCCESS}): a run still writing, or a failed one")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{run}: cannot read: {one_line(e)}") from e
    from semid_dist.lineage import GENERATIONS, Lineage  # imports torch: only for a nightly root

    latest = Lineage(run, store).latest()
    if latest is None:
        if is_s3(run):  # s3fs answers "no such file" to a missing bucket or refused keys too
            store.check_bucket(run)
        what = "S3 prefix" if is_s3(run) else "path"
        raise UserError(f"{run}: no published run here ({what} has no {SUCCESS} and no nightly LATEST)")
    name = latest["generation"]
    gen = join(run.rstrip("/"), GENERATIONS, name)
    if not fs.exists(join(strip_scheme(gen), SUCCESS)):
        raise UserError(f"{gen}: LATEST names generation {name}, which is not published (no {SUCCESS})")
    return gen, f"{run} (generation {name})"


def read_results(run_dir: str, store: Storage) -> dict:
    raw = store.read_bytes(join(run_dir, RESULTS), "training results file")
    try:
        results = json.loads(raw)
        assert isinstance(results, dict) and isinstance(results.get("metrics"), dict)
    except Exception as e:
        raise UserError(f"{join(run_dir, RESULTS)}: not a semid_dist results file") from e
    return results


def read_evaluation(run_dir: str, store: Storage) -> dict:
    raw = store.read_bytes(join(run_dir, EVALUATION), "evaluation file")
    try:
        e = json.loads(raw)
        assert isinstance(e, dict) and e.get("kind") == "evaluation"
    except Exception as e:
        raise UserError(f"{join(run_dir, EVALUATION)}: not a semid_dist evaluation file") from e
    return e


def read_mappings(run_dir: str, store: Storage) -> tuple[np.ndarray | pa.Array, np.ndarray]:
    """A published run's ItemIDs (N,), sorted ascending (catalog.names.sorted_ids: int64 numpy,
    or one Arrow array of strings), and their semantic IDs (N, L+1), int64, in the same order."""
    import pyarrow.parquet as pq

    uri = join(run_dir, MAPPING_PARQUET)
    try:
        t = pq.read_table(
            io.BytesIO(store.read_bytes(uri, "mappings file")), columns=["ItemID", "semantic_id"]
        )
        ids_N, order = sorted_ids(t.column("ItemID"))
        flat = t.column("semantic_id").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        sid_NM = flat.astype(np.int64).reshape(len(ids_N), -1)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{uri}: not a semantic ID mappings file ({one_line(e)})") from e
    return ids_N, sid_NM[order]


class PublishedRun:
    """A published run's mappings: ItemIDs (N,) and semantic IDs (N, L+1), sorted by ItemID.
    String ItemIDs stay one Arrow array (read_mappings); ``item`` gives one as a Python value."""

    def __init__(self, run: str, store: Storage):
        self.dir, self.name = resolve_run(run, store)
        self.store = store
        self.ids_N, self.sid_NM = read_mappings(self.dir, store)
        self.n_levels = self.sid_NM.shape[1] - 1  # the last column is the dedup code
        self.kind = ids_kind(self.ids_N)

    def item(self, row: int) -> int | str:
        return self.ids_N[row].as_py() if self.kind == "string" else int(self.ids_N[row])

    def shown(self, item: int | str) -> str:
        """An ItemID as messages show it: a string quoted, an integer as is."""
        return repr(item) if self.kind == "string" else str(item)

    def row_of(self, item: int | str) -> int:
        i = int(positions([item], self.ids_N)[0])
        if i < 0:
            raise UserError(f"{self.name}: ItemID {self.shown(item)} is not in the published mappings")
        return i

    def under(self, prefix: list[int]) -> np.ndarray:
        """Rows whose semantic ID starts with prefix, in semantic ID order (then ItemID: rows
        are in ItemID order)."""
        p = np.asarray(prefix, np.int64)
        rows = np.flatnonzero((self.sid_NM[:, : len(p)] == p).all(axis=1))
        keys = [rows] + [self.sid_NM[rows, j] for j in range(self.sid_NM.shape[1] - 1, -1, -1)]
        return rows[np.lexsort(keys)]
