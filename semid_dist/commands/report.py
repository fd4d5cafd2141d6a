"""``semid report RUN [RUN2 ...] --out FILE.html``: the quality report of published runs, side by side.

RUN is a published output dir (local or s3://) or a nightly output root, whose LATEST generation
is reported. training_results.json is read (semid_dist/report_html.py renders it), and the
mappings of a run published before the quality metrics existed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from semid_dist.errors import UserError, one_line
from semid_dist.publish import SUCCESS
from semid_dist.storage import DEFAULT_RETRY_BUDGET_S, Storage, is_s3, join, strip_scheme

log = logging.getLogger("semid_dist")

# the names semid_dist/export.py gives these files (a test checks); not imported from there, as
# export imports torch: seconds that `semid report` and `semid inspect --prefix` do not need
RESULTS, MAPPING_PARQUET, MODEL = "training_results.json", "semantic_id_mappings.parquet", "final_model.pt"
EVALUATION = "evaluation.json"  # what `semid evaluate` publishes (commands/evaluate.py)


class ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, ``semid: error: ...``, exit 2, like the other commands."""

    def error(self, message: str):
        print(f"semid: error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def add_s3_flags(p: argparse.ArgumentParser) -> None:
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
    suffix = (m.get("collisions") or {}).get("policy", "suffix") == "suffix"
    want_groups = "group_sizes" not in m and suffix
    k = (results.get("config") or {}).get("n_embed" if results.get("mode") == "tiger" else "n_clusters")
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


def read_evaluation(run_dir: str, store: Storage) -> dict:
    raw = store.read_bytes(join(run_dir, EVALUATION), "evaluation file")
    try:
        e = json.loads(raw)
        assert isinstance(e, dict) and e.get("kind") == "evaluation"
    except Exception as e:
        raise UserError(f"{join(run_dir, EVALUATION)}: not a semid_dist evaluation file") from e
    return e


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except UserError as e:
        print(f"semid: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"semid report: {len(args.runs)} run(s) -> {out}")
    return 0
