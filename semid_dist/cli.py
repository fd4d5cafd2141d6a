"""Command line: ``semid train ...`` (also ``python -m semid_dist ...``).

The original tool's flags keep their names and defaults (``--data_path``, ``--n_layers``, ``--use_ema`` /
``--no_ema`` ...). ``semid --data_path ...`` without a sub-command means ``train``, as the original tool's
``train_tokenizer.py`` did. ``--config FILE`` (YAML/JSON) sets the same fields; flags given on
the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

# Arrow's default allocator (mimalloc) keeps freed pages: a catalog pass streams GBs through a
# few MB of buffers, and the retained pages make the driver and every reading worker hundreds
# of MB larger (BENCHMARKS.md). Set before pyarrow allocates; the workers of a
# local Ray inherit it (jobs/runtime_env.yaml sets it on a cluster).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from semid_dist.config import Config, load_config_file
from semid_dist.errors import find_user_error, one_line

HELP = {
    "data_path": "parquet input: a dir with item_emb.parquet, a file, a dir of shards, a glob, or s3://",
    "output_dir": "where results are published (local path or s3:// prefix)",
    "mode": "tiger (RQ-VAE) or kmeans (residual k-means)",
    "epochs": "training epochs (tiger)",
    "batch_size": "global training batch size (tiger)",
    "learning_rate": "AdamW learning rate (tiger)",
    "device": "auto, cpu or cuda: where tiger trains, items are encoded and the kmeans fit runs",
    "encode_batch_size": "rows per batch for each GPU encoder actor (CPU passes stream 4,096-row blocks)",
    "n_layers": "number of quantization levels",
    "n_embed": "codes per level (tiger)",
    "n_clusters": "codes per level (kmeans)",
    "latent_dim": "latent dimension (tiger)",
    "max_items": "use only the first N items (quick tests)",
    "save_every": "checkpoint every N epochs (tiger)",
    "eval_every": "encode every item for the collision rate, code usage and reconstruction error "
    "every N epochs and at the last; the validation error is logged every epoch (tiger)",
    "log_level": "DEBUG, INFO, WARNING or ERROR (DEBUG also shows tracebacks)",
    "max_iters": "Lloyd iterations per level at full dimension (kmeans)",
    "seed": "random seed (sampling, k-means seeding, model init)",
    "sample_per_centroid": "k-means sample size = this x n_clusters (kmeans)",
    "kmeans_sample_gb": "at most this many GB of k-means sample in memory; a larger sample is "
    "cut to it, with a warning (kmeans)",
    "kmeans_full_dim_levels": "fit the first N levels in the full dimension, not progressively: "
    "lower reconstruction error, more collisions on real catalogs (kmeans)",
    "kmeans_fit": "sample: fit on the hash sample; stream: then refine with full passes over every "
    "item, spread over the cluster; auto: stream when --kmeans_sample_gb would cut the sample (kmeans)",
    "kmeans_stream_passes": "at most this many full-catalog Lloyd passes after the sample fit (stream)",
    "beam_size": "encode with beam search, keeping this many code paths per level; stored with the "
    "tokenizer, so encode, nightly and the API apply it (kmeans; 1: greedy)",
    "collision_policy": "suffix: items sharing all L codes get a dedup code 1, 2, ...; relocate: the one "
    "nearest its codes keeps them, the others move to free last-level codes under the same prefix "
    "when one is among their candidates (math/relocate.py)",
    "relocate_candidates": "last-level candidates per item kept by the encode pass (relocate)",
    "s3_retry_budget_s": "seconds S3 errors are retried before the run stops with an error",
    "keep_model": "best: publish the evaluation epoch with the lowest validation reconstruction error "
    "(then the lower collision rate); last: the last epoch (tiger)",
    "num_workers": "Ray Train workers (tiger)",
    "resume": "continue from the latest checkpoint (tiger)",
    "max_failures": "restarts allowed after a worker failure (tiger)",
    "ray_address": "Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    "s3_endpoint_url": "S3 endpoint override (default: AWS_ENDPOINT_URL)",
    "item_titles": "parquet with ItemID,title shown in the summary",
    "tokenizer": "existing final_model.pt to apply (encode, nightly)",
    "generation": "nightly: name of tonight's generation (default: today's UTC date)",
    "retrain": "nightly: fit a new tokenizer instead of reusing the previous generation's",
    "changed_policy": "nightly: keep_if_same_codes or reassign, for items whose embedding changed",
}
# sub-command -> module whose run(cfg, log_dir=...) does the work and returns the results dict
COMMANDS = {
    "train": "semid_dist.commands.train",
    "encode": "semid_dist.commands.encode",
    "nightly": "semid_dist.commands.nightly",
}

# read-only sub-commands with their own argparse: main(argv) -> exit status
TOOLS = {"report": "semid_dist.commands.report", "inspect": "semid_dist.commands.inspect"}


def _arg_type(tp):
    if tp in (int, "int"):
        return int
    if tp in (float, "float"):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semid",
        description="Train semantic-ID tokenizers (tiger / kmeans). Judging their IDs downstream: "
        "semid evaluate -h. Reading published runs: semid report -h, semid inspect -h.",
    )
    p.add_argument(
        "command",
        nargs="?",
        default="train",
        choices=sorted(COMMANDS),
        help="train: fit a tokenizer and export IDs (default); encode: apply an existing "
        "tokenizer (--tokenizer) to a catalog; nightly: write a new ID generation "
        "that keeps unchanged items' IDs",
    )
    p.add_argument("--config", help="YAML or JSON file of config fields")
    p.add_argument("--log_dir", default=argparse.SUPPRESS, help="local folder for log files (default: logs)")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        name, tp = f.name, hints[f.name]
        h = HELP.get(name, name.replace("_", " "))
        if name == "use_ema":
            p.add_argument(
                "--use_ema",
                dest="use_ema",
                action="store_true",
                default=argparse.SUPPRESS,
                help="EMA codebook updates (default)",
            )
            p.add_argument(
                "--no_ema",
                dest="use_ema",
                action="store_false",
                default=argparse.SUPPRESS,
                help="learn codebooks by gradient",
            )
        elif tp is bool:
            p.add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=h
            )
        else:
            base = tp if tp in (int, float, str) else int  # int | None (max_items)
            p.add_argument(
                f"--{name}",
                type=_arg_type(base),
                default=argparse.SUPPRESS,
                help=f"{h} (default: {f.default})",
            )
    return p


def parse_config(argv: list[str]) -> tuple[Config, dict]:
    ns = vars(build_parser().parse_args(argv))
    extra = {"log_dir": ns.pop("log_dir", "logs"), "command": ns.pop("command", "train")}
    fields: dict = {}
    cfg_file = ns.pop("config", None)
    if cfg_file:
        fields.update(load_config_file(cfg_file))
    fields.update(ns)  # only flags actually given (defaults are suppressed)
    return Config.from_dict(fields), extra


def print_summary(results: dict) -> None:
    m, c = results["metrics"], results["config"]
    k = c["n_embed"] if results["mode"] == "tiger" else c["n_clusters"]
    used = ", ".join(str(lv["codes_used"]) for lv in m["levels"])
    ppl = ", ".join(f"{lv['perplexity']:.0f}" for lv in m["levels"])
    print(
        f"\nsemid_dist {results['mode']}: {results['input']['items']} items -> "
        f"{c['n_layers']} levels x {k} codes + 1 dedup code"
    )
    print(f"  collision rate before dedup: {100 * m['collision_rate']:.2f}%  (max bucket {m['max_bucket']})")
    print(f"  codes used per level:        {used}")
    print(f"  perplexity per level:        {ppl}")
    print(f"  relative recon. error:       {m['relative_reconstruction_error']:.4f}")
    pol = m.get("collisions", {})
    if pol.get("policy") == "relocate":
        err = f", recon. error {pol['error_after']:.4f}" if "error_after" in pol else ""
        print(
            f"  collision policy relocate:   {pol['moved']} items moved, {pol['suffix_items']} need a suffix;"
            f" collision rate {100 * pol['rate_after']:.2f}%{err}"
        )
    print(f"  wall time:                   {results['timings_s']['total']:.1f} s")
    print(f"  outputs:                     {results['output_dir']}")
    print(f"  log:                         {results['log_path']}")
    if results.get("counts"):
        n, g = results["counts"], results["generation"]
        print(
            f"  generation:                  {g['name']} (#{g['seq']}, {g['status']}, LATEST {g['latest']})"
        )
        print(
            f"  items:                       {n['stable']} stable, {n['new']} new, {n['changed']} changed "
            f"({n['changed_kept_id']} kept their ID), {n['removed']} removed, {n['reclaimed']} reclaimed"
        )
    if results.get("examples"):
        print("  items sharing a prefix:")
        for ex in results["examples"]:
            title = f"  {ex['title']}" if ex.get("title") else ""
            print(f"    {ex['ItemID']:>8}  {ex['semantic_id']}{title}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:  # their own flags: no Config, no Ray
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if argv and argv[0] == "evaluate":  # its own config and summary, run like the others
        return guarded(lambda: _evaluate(argv[1:]), argv)

    def train_like() -> None:
        import importlib

        cfg, extra = parse_config(argv)
        print_summary(importlib.import_module(COMMANDS[extra["command"]]).run(cfg, log_dir=extra["log_dir"]))

    return guarded(train_like, argv)


def _evaluate(argv: list[str]) -> None:
    from semid_dist.commands import evaluate
    from semid_dist.commands.report import ArgParser
    from semid_dist.evaluate.config import EvalConfig, build_parser

    ns = vars(build_parser(ArgParser).parse_args(argv))
    log_dir = ns.pop("log_dir")
    evaluate.print_summary(evaluate.run(EvalConfig.from_dict(ns), log_dir=log_dir))


def guarded(work, argv: list[str]) -> int:
    """Run a command: 0; a user error: one line, 2; anything else: one line, 1 (the traceback
    only with --log_level DEBUG). A local Ray the command started is stopped either way."""
    debug = "DEBUG" in [a.upper() for a in argv]
    try:
        try:
            work()
        finally:
            from semid_dist.runtime import stop_local_ray

            stop_local_ray()
        return 0
    except KeyboardInterrupt:
        print("semid: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as e:  # one line for user errors; traceback only with DEBUG
        err = find_user_error(e)
        if debug:
            logging.getLogger("semid_dist").exception("run failed")
        if err is not None:
            print(f"semid: error: {one_line(err)}", file=sys.stderr)
            return 2
        print(
            f"semid: internal error: {type(e).__name__}: {one_line(e)}"
            + ("" if debug else " (rerun with --log_level DEBUG for the traceback)"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
