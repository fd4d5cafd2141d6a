"""The skeleton every command runs in (``semid train``, ``encode`` and ``nightly``).

    with Run(cfg, log_dir) as run:
        catalog, n_items = run.inspect()          # footers and one row; no embedding read
        pub = run.publisher(cfg.output_dir)        # staging; aborted if the block raises
        where = run.connect()                      # Ray started or joined; CPU or GPUs
        with run.stage("fit"):
            ...                                    # the command's own steps
        results = run.results(...)                 # the fields every run reports
        run.publish(results, manifest)             # results, log, then _SUCCESS

A Run owns the log file (the original tool's name, with the mode that actually ran), the stage
timings, the storage (S3 endpoint resolved once), and the Publisher: whatever the block raises,
the staging area is removed and nothing is published.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from semid_dist import __version__, export, runtime
from semid_dist.catalog.plumbing import trim_heap
from semid_dist.catalog.schema import SPLIT_ROWS, Catalog, inspect_catalog
from semid_dist.config import Config
from semid_dist.errors import one_line
from semid_dist.io.publish import Publisher
from semid_dist.io.storage import Storage, strip_scheme
from semid_dist.math.dedup import row_groups

log = logging.getLogger("semid_dist")


def log_file_name(cfg: Config, timestamp: str, mode: str | None = None) -> str:
    """The original tool's naming: {timestamp}_{dataset}_{mode}_ep{epochs}_bs{batch_size}.log"""
    return f"{timestamp}_{cfg.dataset_name}_{mode or cfg.mode}_ep{cfg.epochs}_bs{cfg.batch_size}.log"


class Run:
    """One command's run, from its first log line to its publish (see the module docstring)."""

    def __init__(self, cfg: Config, log_dir: str = "logs") -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        self.store = Storage.resolve(cfg.s3_endpoint_url, cfg.s3_retry_budget_s)
        self.stages: dict[str, float] = {}
        self.stage_peaks: dict[str, float] = {}  # the driver's peak RSS (GB) in each stage
        self.pub: Publisher | None = None
        self.log_path = ""
        self._timestamp = time.strftime("%Y%m%d_%H%M%S")
        self._t0 = time.perf_counter()
        self._started = False  # a step has read the config (use_config is too late then)

    # --- the run's frame ----------------------------------------------------------------------
    def __enter__(self) -> Run:
        self._t0 = time.perf_counter()
        self.log_path = _open_log(
            os.path.join(self.log_dir, log_file_name(self.cfg, self._timestamp)), self.cfg.log_level
        )
        cfg = self.cfg
        log.info(
            "semid_dist %s: mode=%s data=%s output=%s", __version__, cfg.mode, cfg.data_path, cfg.output_dir
        )
        log.info("config: %s", cfg.to_dict())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.pub is not None:
            self.pub.abort()
        close_logging()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage; its duration goes to the log and to the results' timings_s."""
        t0 = time.perf_counter()
        trim_heap()  # what earlier stages freed goes back to the OS before the peak is reset
        reset_peak_rss()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 3)
        self.stage_peaks[name] = round(peak_rss_gb(), 3)
        peak = self.stage_peaks[name]
        log.info("stage %s: %.2f s (driver peak RSS %.2f GB)", name, self.stages[name], peak)

    def timings(self) -> dict[str, float]:
        return {**self.stages, "total": round(time.perf_counter() - self._t0, 3)}

    def use_config(self, cfg: Config) -> None:
        """The config as this run really runs it, resolved once from the flags and what the run
        found before its first step (a nightly lineage's policies, a given tokenizer's mode and
        sizes). Every step after reads it from here; it is what results and models record."""
        assert not self._started, "use_config after a step has read the config"
        changed = {k: v for k, v in cfg.to_dict().items() if getattr(self.cfg, k) != v}
        if changed:
            log.info("config as run (resolved from the flags): %s", changed)
        self.name_log_by_mode(cfg.mode)
        self.cfg = cfg

    def name_log_by_mode(self, mode: str) -> None:
        """Rename the log file after the mode that runs, when it differs from cfg.mode (a
        nightly run that reuses a kmeans tokenizer without --mode)."""
        path = os.path.join(self.log_dir, log_file_name(self.cfg, self._timestamp, mode))
        if path == self.log_path:
            return
        os.replace(self.log_path, path)  # the open handler keeps writing to the same file
        for h in log.handlers:
            if isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(self.log_path):
                h.baseFilename = os.path.abspath(path)
        self.log_path = path

    # --- the steps every command shares --------------------------------------------------------
    def inspect(self) -> tuple[Catalog, int]:
        """The catalog's files, schema and row counts (no embedding is read), and how many items
        the run uses (--max_items)."""
        self._started = True
        cfg = self.cfg
        with self.stage("inspect"):
            catalog = inspect_catalog(self.store.list_parquet(cfg.data_path), self.store)
        n_items = min(catalog.num_rows, cfg.max_items or catalog.num_rows)
        log.info(
            "input: %d parquet file(s), %d rows, dim %d%s",
            len(catalog.files),
            catalog.num_rows,
            catalog.dim,
            f" (using the first {n_items})" if n_items < catalog.num_rows else "",
        )
        path, rows = catalog.largest_row_group
        if rows > SPLIT_ROWS and n_items > SPLIT_ROWS:
            log.warning(
                "%s: a row group of %d rows, which one task reads alone in every pass (a read task "
                "cannot split a row group); row groups of ~65,536 rows let several cores read it",
                path,
                rows,
            )
        return catalog, n_items

    def publisher(self, output_dir: str) -> Publisher:
        """The staging area for output_dir, checked writable now, before any compute."""
        self.pub = Publisher(output_dir, self.store)
        return self.pub

    def connect(self) -> tuple[str, int]:
        """Ray started or joined; where the encode pass runs (catalog.encode.encode_device)."""
        from semid_dist.catalog.encode import encode_device

        self._started = True
        runtime.ensure_ray(self.cfg)
        return encode_device(self.cfg.device)

    def results(
        self,
        catalog: Catalog,
        n_items: int,
        metrics: dict,
        training: dict,
        where: tuple[str, int],
        ids_N: np.ndarray,
        sid_NM: np.ndarray,
        **extra: Any,
    ) -> dict:
        """training_results.json: the fields every run reports; extra ones (the nightly
        generation and counts) come after the input."""
        return {
            "semid_dist_version": __version__,
            "mode": self.cfg.mode,
            "config": self.cfg.to_dict(),
            "input": {
                "files": len(catalog.files),
                "rows": catalog.num_rows,
                "items": n_items,
                "dim": catalog.dim,
            },
            **extra,
            "metrics": metrics,
            "training": training,
            "encode": {"device": where[0], "gpu_actors": where[1]},
            "timings_s": {},
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "run_id": self.pub.run_id if self.pub else None,
            "log_file": os.path.basename(self.log_path),
            "examples": self.example_items(ids_N, sid_NM),
        }

    def publish(self, results: dict, manifest: dict) -> None:
        """How every run ends: training_results.json, the run's log (closed first, so it is
        complete), then _SUCCESS with the manifest; until then nothing is visible to readers."""
        assert self.pub is not None
        results["timings_s"] = self.timings()
        export.write_results(self.pub, results)
        close_logging()
        self.pub.put_file(self.log_path, f"logs/{os.path.basename(self.log_path)}")
        self.pub.publish(manifest)

    def example_items(self, ids_N, sid_NM: np.ndarray) -> list[dict]:
        """Items of the largest group sharing a two-code prefix: what the IDs mean, at a glance.
        ids_N: integer ItemIDs (numpy) or string ItemIDs (an Arrow array)."""
        cfg = self.cfg
        if cfg.examples <= 0 or len(ids_N) == 0:
            return []
        depth = min(2, sid_NM.shape[1] - 1)
        group_N = row_groups(sid_NM[:, :depth])[0]
        rows = np.flatnonzero(group_N == int(np.argmax(np.bincount(group_N))))[: cfg.examples]
        if isinstance(ids_N, np.ndarray):
            items = [int(i) for i in ids_N[rows]]
        else:
            items = ids_N.take(rows).to_pylist()
        titles = self._titles(items) if cfg.item_titles else {}
        return [
            {
                "ItemID": item,
                "semantic_id": sid_NM[r].tolist(),
                **({"title": titles.get(item)} if titles else {}),
            }
            for item, r in zip(items, rows, strict=True)
        ]

    def _titles(self, ids: list) -> dict:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        path = self.cfg.item_titles
        try:
            with self.store.fs(path).open(strip_scheme(path), "rb") as f:
                t = pq.read_table(f, columns=["ItemID", "title"])
        except Exception as e:
            log.warning("cannot read --item_titles %s: %s", path, one_line(e))
            return {}
        try:
            t = t.filter(pc.is_in(t.column("ItemID"), value_set=pa.array(ids)))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            log.warning("--item_titles %s: its ItemIDs do not match the catalog's: %s", path, one_line(e))
            return {}
        return dict(zip(t.column("ItemID").to_pylist(), t.column("title").to_pylist(), strict=True))


def _open_log(path: str, level: str) -> str:
    """Log to stderr and to path; returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    log.setLevel(getattr(logging, level))
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s - %(levelname)s - %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(fmt)
    log.addHandler(console)
    log.addHandler(to_file)
    log.propagate = False
    return path


def close_logging() -> None:
    """Flush the log and close its file (the console handler stays until the next run)."""
    for h in list(log.handlers):
        h.flush()
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


def peak_rss_gb() -> float:
    """This process's peak resident memory since the last reset_peak_rss() (Linux: VmHWM; else
    the peak since the start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def reset_peak_rss() -> None:
    """Start a new high-water mark (Linux >= 4.0), so that each stage reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
