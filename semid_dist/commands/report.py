"""``semid report RUN [RUN2 ...] --out FILE.html``: the quality report of published runs, side by side.

RUN is a published output dir (local or s3://) or a nightly output root, whose LATEST generation
is reported. Only training_results.json is read (semid_dist/report_html.py renders it).
"""

from __future__ import annotations

import argparse
import json
import sys

from semid_dist import export
from semid_dist.errors import UserError, one_line
from semid_dist.publish import SUCCESS
from semid_dist.storage import Storage, is_s3, join, strip_scheme


class ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, ``semid: error: ...``, exit 2, like the other commands."""

    def error(self, message: str):
        print(f"semid: error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def resolve_run(run: str, store: Storage) -> tuple[str, str]:
    """(the published output dir, how to name it) for RUN: a published output dir as is, a nightly
    output root's LATEST generation. A missing or unpublished run is a UserError."""
    from semid_dist.lineage import GENERATIONS, Lineage

    fs = store.fs(run)
    path = strip_scheme(run).rstrip("/")
    try:
        if fs.exists(join(path, SUCCESS)):
            return run.rstrip("/"), run
        if fs.exists(join(path, export.RESULTS)):
            raise UserError(f"{run}: not published (no {SUCCESS}): a run still writing, or a failed one")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{run}: cannot read: {one_line(e)}") from e
    latest = Lineage(run, store).latest()
    if latest is None:
        what = "S3 prefix" if is_s3(run) else "path"
        raise UserError(f"{run}: no published run here ({what} has no {SUCCESS} and no nightly LATEST)")
    name = latest["generation"]
    gen = join(run.rstrip("/"), GENERATIONS, name)
    if not fs.exists(join(strip_scheme(gen), SUCCESS)):
        raise UserError(f"{gen}: LATEST names generation {name}, which is not published (no {SUCCESS})")
    return gen, f"{run} (generation {name})"


def read_results(run_dir: str, store: Storage) -> dict:
    raw = store.read_bytes(join(run_dir, export.RESULTS), "training results file")
    try:
        results = json.loads(raw)
        assert isinstance(results, dict) and isinstance(results.get("metrics"), dict)
    except Exception as e:
        raise UserError(f"{join(run_dir, export.RESULTS)}: not a semid_dist results file") from e
    return results


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="semid report",
        description="Render the quality report (HTML) of published runs, side by side.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="published output dir or nightly output root")
    p.add_argument("--out", required=True, help="the HTML file to write (local path or s3://)")
    p.add_argument("--s3_endpoint_url", default="", help="S3 endpoint override (default: AWS_ENDPOINT_URL)")
    return p


def run(args: argparse.Namespace) -> str:
    from semid_dist import report_html

    store = Storage.resolve(args.s3_endpoint_url)
    results, titles = [], []
    for r in args.runs:
        run_dir, title = resolve_run(r, store)
        results.append(read_results(run_dir, store))
        titles.append(title)
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
