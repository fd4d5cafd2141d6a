"""One run, top to bottom: inputs -> scan pass -> fit -> encode pass -> dedup -> export -> publish."""

from __future__ import annotations

import logging
import os
import platform
import time
from typing import Any, Callable

import numpy as np

from semid_dist import __version__, export, passes, storage
from semid_dist import data as datalib
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math import sampling
from semid_dist.math.dedup import dedup_codes, row_groups
from semid_dist.math.metrics import quality_report
from semid_dist.runtime import close_logging, ensure_ray, setup_logging

log = logging.getLogger("semid_dist")


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    def stage(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = round(time.perf_counter() - self.t0, 3)
                if exc[0] is None:
                    log.info("stage %s: %.2f s", name, timer.stages[name])

        return _Ctx()


def _fit(cfg: Config, ds, info, scan, n_items: int, pub) -> tuple[Any, dict]:
    if cfg.mode == "kmeans":
        from semid_dist import kmeans_mode

        return kmeans_mode.fit(cfg, scan)
    try:
        from semid_dist.tiger import trainer
    except ImportError:
        raise UserError("--mode tiger is not available in this build yet; use --mode kmeans") from None
    return trainer.fit(cfg, ds, info, scan, n_items, pub)


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Train a tokenizer, encode the catalog, publish the outputs. Returns training_results."""
    return execute(cfg, log_dir, fit=_fit)


FitFn = Callable[..., "tuple[Any, dict]"]  # (cfg, ds, info, scan|None, n_items, pub) -> (Tokenizer, info)


def execute(cfg: Config, log_dir: str, fit: FitFn, scan_first: bool = True) -> dict:
    """The shared run: inputs -> [scan pass] -> fit -> encode pass -> dedup -> export -> publish.

    scan_first=False skips the validation/sample pass (for applying an existing tokenizer):
    the encode pass validates every row too, and duplicates are checked on its ItemIDs.
    """
    log_path = setup_logging(cfg, log_dir)
    t_start = time.perf_counter()
    timer = _Timer()
    ep = cfg.s3_endpoint_url
    pub = None
    try:
        log.info(
            "semid_dist %s: mode=%s data=%s output=%s", __version__, cfg.mode, cfg.data_path, cfg.output_dir
        )
        log.info("config: %s", cfg.to_dict())
        files, info, n_items = inspect_stage(cfg, timer)
        if scan_first:
            check_enough_items(cfg, n_items, info.dim)
        pub = storage.Publisher(cfg.output_dir, ep)
        where, ds = connect(cfg, info)
        scan = scan_stage(cfg, info, n_items, timer) if scan_first else None
        with timer.stage("fit"):
            tokenizer, fit_info = fit(cfg, ds, info, scan, n_items, pub)
        with timer.stage("encode"):
            enc = passes.encode_catalog(info, tokenizer, ep, n_items, where, cfg.encode_batch_size)
            if scan is None:
                passes.check_unique_ids(enc.ids_N, files, ep)
        with timer.stage("dedup"):
            dedup_N = dedup_codes(enc.ids_N, enc.codes_NL)
            sid_NM = export.semantic_ids(enc.codes_NL, dedup_N)
            quality = quality_report(enc.codes_NL, tokenizer.n_codes, enc.sq_err_sum, enc.sq_norm_sum)
            quality["max_dedup_code"] = int(dedup_N.max()) if dedup_N.size else 0
            assert row_groups(sid_NM)[1].all(), "dedup left a duplicate ID"
        with timer.stage("export"):
            export.write_mappings(pub, enc.ids_N, sid_NM, cfg.dataset_name)
            export.write_torch(pub, export.MODEL, tokenizer.payload())
        results = {
            "semid_dist_version": __version__,
            "mode": cfg.mode,
            "config": cfg.to_dict(),
            "input": {"files": len(files), "rows": info.num_rows, "items": n_items, "dim": info.dim},
            "metrics": quality,
            "training": fit_info,
            "encode": {"device": where[0], "gpu_actors": where[1]},
            "timings_s": {**timer.stages, "total": round(time.perf_counter() - t_start, 3)},
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "run_id": pub.run_id,
            "log_file": os.path.basename(log_path),
            "examples": example_items(enc.ids_N, sid_NM, cfg),
        }
        log.info(
            "collision rate before dedup %.3f%%, max bucket %d, codes used per level %s, "
            "relative reconstruction error %.4f",
            100 * quality["collision_rate"],
            quality["max_bucket"],
            [lv["codes_used"] for lv in quality["levels"]],
            quality["relative_reconstruction_error"],
        )
        publish_run(pub, results, log_path, {"mode": cfg.mode, "items": n_items})
        results["output_dir"] = cfg.output_dir
        results["log_path"] = log_path
        return results
    except BaseException:
        if pub is not None:
            pub.abort()
        raise
    finally:
        close_logging()


def inspect_stage(cfg: Config, timer: _Timer) -> tuple[list[str], datalib.InputInfo, int]:
    """The input files, their schema and row counts (no embedding is read), and how many items
    the run uses (--max_items)."""
    with timer.stage("inspect"):
        files = storage.list_parquet_inputs(cfg.data_path, cfg.s3_endpoint_url)
        info = datalib.inspect_inputs(files, cfg.s3_endpoint_url)
    n_items = min(info.num_rows, cfg.max_items or info.num_rows)
    log.info(
        "input: %d parquet file(s), %d rows, dim %d%s",
        len(files),
        info.num_rows,
        info.dim,
        f" (using the first {n_items})" if n_items < info.num_rows else "",
    )
    path, rows = info.largest_row_group
    if rows > datalib.SPLIT_ROWS and n_items > datalib.SPLIT_ROWS:
        log.warning(
            "%s: a row group of %d rows, which one task reads alone in every pass (a read "
            "task cannot split a row group); row groups of ~65,536 rows let several cores "
            "read it",
            path,
            rows,
        )
    return files, info, n_items


def connect(cfg: Config, info: datalib.InputInfo) -> tuple[tuple[str, int], Any]:
    """Ray started or joined; where the encode pass will run (passes.encode_device); the Ray
    Dataset tiger training reads (None in kmeans mode: the catalog passes build their own)."""
    ensure_ray(cfg)
    where = passes.encode_device(cfg.device)
    ds = (
        datalib.read_dataset(info, cfg.s3_endpoint_url, cfg.max_items, passes.read_tasks())
        if cfg.mode == "tiger"
        else None
    )
    return where, ds


def check_enough_items(cfg: Config, n_items: int, dim: int) -> None:
    """Before fitting: a codebook cannot have more codes than there are items to fit it on, and
    the k-means sample must fit in --kmeans_sample_gb (sample_target)."""
    if cfg.n_codes > n_items:
        flag = "n_embed" if cfg.mode == "tiger" else "n_clusters"
        raise UserError(f"--{flag} {cfg.n_codes} is larger than the number of items ({n_items})")
    sample_target(cfg, dim)


def sample_target(cfg: Config, dim: int) -> int:
    """Rows the scan pass keeps for the fit (a hash sample of about this many): none for tiger,
    which trains on every item; for kmeans --sample_per_centroid x --n_clusters, cut to what
    --kmeans_sample_gb holds (large codebooks: 256 x 8,192 rows of 768-d floats would be 6.4 GB
    in the driver), and never below math.sampling.sample_floor."""
    if cfg.mode != "kmeans":
        return 0
    cap = int(cfg.kmeans_sample_gb * 1e9 // (4 * dim))
    floor = sampling.sample_floor(cfg.n_clusters)
    if cap < floor:
        raise UserError(
            f"--kmeans_sample_gb {cfg.kmeans_sample_gb:g} holds {cap} rows of {dim} floats; "
            f"--n_clusters {cfg.n_clusters} needs a sample of at least {floor}"
        )
    return max(min(cfg.sample_per_centroid * cfg.n_clusters, cap), floor)


def scan_stage(cfg: Config, info: datalib.InputInfo, n_items: int, timer: _Timer) -> passes.ScanResult:
    """The scan pass before a fit (every row validated, the hash sample kept), and no ItemID
    twice."""
    target = sample_target(cfg, info.dim)
    if cfg.mode == "kmeans" and target < min(cfg.sample_per_centroid * cfg.n_clusters, n_items):
        log.warning(
            "kmeans: sample cut to %d rows (%.0f per centroid instead of %d) to stay within "
            "--kmeans_sample_gb %g; raise it for a larger sample",
            target,
            target / cfg.n_clusters,
            cfg.sample_per_centroid,
            cfg.kmeans_sample_gb,
        )
    with timer.stage("scan"):
        scan = passes.scan_pass(info, cfg.seed, target, cfg.s3_endpoint_url, n_items)
        passes.check_unique_ids(scan.ids_N, info.files, cfg.s3_endpoint_url)
    return scan


def publish_run(pub: storage.Publisher, results: dict, log_path: str, manifest: dict) -> None:
    """How every run ends: training_results.json, the run's log (closed first, so it is
    complete), then _SUCCESS with the manifest; until then nothing is visible to readers."""
    export.write_results(pub, results)
    close_logging()
    pub.put_file(log_path, f"logs/{os.path.basename(log_path)}")
    pub.publish(manifest)


def example_items(ids_N: np.ndarray, sid_NM: np.ndarray, cfg: Config) -> list[dict]:
    """Items of the largest group sharing a two-code prefix: what the IDs mean, at a glance."""
    if cfg.examples <= 0 or ids_N.size == 0:
        return []
    depth = min(2, sid_NM.shape[1] - 1)
    group_N = row_groups(sid_NM[:, :depth])[0]
    rows = np.flatnonzero(group_N == int(np.argmax(np.bincount(group_N))))[: cfg.examples]
    titles = _titles(cfg, ids_N[rows]) if cfg.item_titles else {}
    return [
        {
            "ItemID": int(ids_N[r]),
            "semantic_id": sid_NM[r].tolist(),
            **({"title": titles.get(int(ids_N[r]))} if titles else {}),
        }
        for r in rows
    ]


def _titles(cfg: Config, ids: np.ndarray) -> dict[int, str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs = storage.filesystem(cfg.item_titles, cfg.s3_endpoint_url)
    try:
        with fs.open(storage.strip_scheme(cfg.item_titles), "rb") as f:
            t = pq.read_table(f, columns=["ItemID", "title"])
    except Exception as e:
        log.warning("cannot read --item_titles %s: %s", cfg.item_titles, str(e).splitlines()[0])
        return {}
    t = t.filter(pc.is_in(t.column("ItemID"), value_set=__import__("pyarrow").array(ids.tolist())))
    return dict(zip(t.column("ItemID").to_pylist(), t.column("title").to_pylist()))
