"""``semid report RUN [RUN2 ...] --out FILE.html``: the quality report of published runs, side by side.

RUN is a published output dir (local or s3://) or a nightly output root, whose LATEST generation
is reported. training_results.json is read (semid_dist/report_html.py renders it), and the
mappings of a run published before the quality metrics existed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from semid_dist.config import CODES_FIELD
from semid_dist.errors import UserError, one_line
from semid_dist.io.storage import Storage, is_s3, join, strip_scheme
from semid_dist.options import ArgParser
from semid_dist.pipeline.collisions import CollisionSummary
from semid_dist.published import (
    EVALUATION,
    MAPPING_PARQUET,
    add_s3_flags,
    read_evaluation,
    read_results,
    resolve_run,
    storage,
)

log = logging.getLogger("semid_dist")


def fill_from_mappings(results: dict, run_dir: str, store: Storage) -> None:
    """A run published before the report existed: its Gini per level and group-size histogram,
    from its semantic_id_mappings.parquet (read whole; only when they are missing), under the
    suffix policy, whose published codes are the tokenizer's."""
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from semid_dist.math.quality import gini, group_size_histogram

    m = results["metrics"]
    levels = m.get("levels") or []
    pol = CollisionSummary.read(results)
    suffix = pol is None or pol.policy == "suffix"  # runs from before the record used suffix
    want_groups = "group_sizes" not in m and suffix
    k = (results.get("config") or {}).get(CODES_FIELD.get(results.get("mode"), "n_clusters"))
    want_gini = suffix and isinstance(k, int) and any("gini" not in lv for lv in levels)
    if not (want_groups or want_gini):
        return
    uri = join(run_dir, MAPPING_PARQUET)
    try:
        col = pq.read_table(io.BytesIO(store.read_bytes(uri, "mappings file")), columns=["semantic_id"])[0]
        flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        codes_NL = flat.reshape(len(col), -1)[:, :-1]  # the last code is the dedup code
    except Exception as e:  # the report still renders, without these sections
        log.warning("%s: cannot derive the group sizes and Gini (%s)", uri, one_line(e))
        return
    if want_groups:
        h = group_size_histogram(codes_NL)
        m["group_sizes"] = {"before": h, "after": h, "source": MAPPING_PARQUET}
    if want_gini:
        for lv in levels:
            if "gini" not in lv and 0 <= lv.get("level", -1) < codes_NL.shape[1]:
                lv["gini"] = gini(np.bincount(codes_NL[:, lv["level"]], minlength=k))


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="semid report",
        description="Render the quality report (HTML) of published runs, or the figures of "
        "evaluations (semid evaluate), side by side.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="published output dir, nightly output root, or evaluation dir"
    )
    p.add_argument("--out", required=True, help="the HTML file to write (local path or s3://)")
    add_s3_flags(p)
    return p


def run(args: argparse.Namespace) -> str:
    store = storage(args)
    results, evaluations, titles = [], [], []
    for r in args.runs:
        run_dir, title = resolve_run(r, store)
        titles.append(title)
        if store.fs(run_dir).exists(join(strip_scheme(run_dir), EVALUATION)):
            evaluations.append(read_evaluation(run_dir, store))
            continue
        results.append(read_results(run_dir, store))
        fill_from_mappings(results[-1], run_dir, store)
    if results and evaluations:
        raise UserError("semid report: give published runs or evaluations (semid evaluate), not both")
    if evaluations:
        from semid_dist.evaluate import html

        page = html.render(evaluations, titles)
    else:
        from semid_dist import report_html

        page = report_html.render(results, titles)
    try:
        fs = store.fs(args.out)
        if not is_s3(args.out):
            parent = strip_scheme(args.out).rsplit("/", 1)[0] if "/" in args.out else ""
            if parent:
                fs.makedirs(parent, exist_ok=True)
        with fs.open(strip_scheme(args.out), "w") as f:
            f.write(page)
    except Exception as e:
        raise UserError(f"{args.out}: cannot write the report: {one_line(e)}") from e
    return args.out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except UserError as e:
        print(f"semid: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"semid report: {len(args.runs)} run(s) -> {out}")
    return 0
