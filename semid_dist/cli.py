"""Command line: ``semid <command> ...`` (also ``python -m semid_dist ...``).

``semid --help`` lists the sub-commands; ``semid train --help`` (encode, nightly) lists that
command's flags in groups, built from the Config fields' help and roles (semid_dist/options.py).
The original tool's flags keep their names and defaults (``--data_path``, ``--n_layers``, ``--use_ema`` /
``--no_ema`` ...). ``semid --data_path ...`` without a sub-command means ``train``, as the original tool's
``train_tokenizer.py`` did. ``--config FILE`` (YAML/JSON) sets the same fields; flags given on
the command line win. evaluate, report and inspect parse their own flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Arrow's default allocator (mimalloc) keeps freed pages: a catalog pass streams GBs through a
# few MB of buffers, and the retained pages make the driver and every reading worker hundreds
# of MB larger (BENCHMARKS.md). Set before pyarrow allocates; the workers of a
# local Ray inherit it (jobs/runtime_env.yaml sets it on a cluster).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from semid_dist.config import CODES_FIELD, GROUPS, Config, load_config_file
from semid_dist.errors import find_user_error, one_line
from semid_dist.options import ArgParser, add_fields

# sub-command -> module whose run(cfg, log_dir=...) does the work and returns the results dict
COMMANDS = {
    "train": "semid_dist.commands.train",
    "encode": "semid_dist.commands.encode",
    "nightly": "semid_dist.commands.nightly",
}

# read-only sub-commands with their own argparse: main(argv) -> exit status
TOOLS = {"report": "semid_dist.commands.report", "inspect": "semid_dist.commands.inspect"}

# every sub-command, as `semid --help` lists it
SUMMARIES = {
    "train": "fit a tokenizer (tiger or kmeans) and export the catalog's semantic IDs",
    "encode": "apply an existing tokenizer (--tokenizer) to a catalog and export its IDs",
    "nightly": "write a new generation of IDs that keeps unchanged items' IDs",
    "evaluate": "judge published IDs downstream: a generative retriever trained on interactions",
    "report": "render the HTML quality report of published runs or evaluations, side by side",
    "inspect": "look up an item's semantic ID, or the items under a prefix",
}
BARE = "Flags with no command mean train, as with the original tool."
USAGE = {
    "train": "semid [train] --data_path PATH --output_dir OUT [flags]",
    "encode": "semid encode --data_path PATH --output_dir OUT --tokenizer MODEL [flags]",
    "nightly": "semid nightly --data_path PATH --output_dir ROOT [flags]",
}


def top_parser() -> ArgParser:
    """`semid --help`: the sub-commands, one line each."""
    width = max(map(len, SUMMARIES))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, line in SUMMARIES.items())
    return ArgParser(
        prog="semid",
        usage="semid <command> [flags]",
        description="Semantic-ID tokenizers (tiger RQ-VAE, residual k-means), trained and applied on Ray."
        f"\n\ncommands:\n{listing}",
        epilog=f"'semid <command> --help' lists a command's flags. {BARE[:-1]}:\n"
        "  semid --data_path PATH --output_dir OUT --mode kmeans ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser(command: str = "train") -> ArgParser:
    """The flags of train, encode or nightly, grouped; the fields that do not apply to command
    are accepted (a config made for another command still parses) but not listed."""
    about = SUMMARIES[command]
    bare = f" {BARE}" if command == "train" else ""
    p = ArgParser(
        prog=f"semid {command}", usage=USAGE[command], description=f"{about[0].upper()}{about[1:]}.{bare}"
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of config fields; flags on the command line win"
    )
    groups = add_fields(p, Config, GROUPS, command)
    groups["logging"].add_argument(
        "--log_dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="local folder for log files (default: logs)",
    )
    return p


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(train, encode or nightly; the flags): no sub-command means train."""
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "train", argv


def parse_config(argv: list[str]) -> tuple[Config, dict]:
    command, flags = split_command(argv)
    ns = vars(build_parser(command).parse_args(flags))
    extra = {"log_dir": ns.pop("log_dir", "logs"), "command": command}
    fields: dict = {}
    cfg_file = ns.pop("config", None)
    if cfg_file:
        fields.update(load_config_file(cfg_file))
    fields.update(ns)  # only flags actually given (defaults are suppressed)
    return Config.from_dict(fields), extra


def print_summary(results: dict) -> None:
    from semid_dist.pipeline.collisions import CollisionSummary

    m, c = results["metrics"], results["config"]
    k = c[CODES_FIELD[results["mode"]]]
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
    pol = CollisionSummary.read(results)
    if pol and pol.policy == "relocate":
        err = f", recon. error {pol.error_after:.4f}" if pol.error_after is not None else ""
        print(
            f"  collision policy relocate:   {pol.moved} items moved, {pol.suffix_items} need a suffix;"
            f" collision rate {100 * pol.rate_after:.2f}%{err}"
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
    first = argv[0] if argv else ""
    if first in ("-h", "--help"):
        top_parser().print_help()
        return 0
    if first and not first.startswith("-") and first not in SUMMARIES:
        top_parser().error(f"unknown command {first!r}: choose from {', '.join(SUMMARIES)} (semid --help)")
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
    from semid_dist.evaluate.config import EvalConfig, build_parser

    ns = vars(build_parser().parse_args(argv))
    log_dir = ns.pop("log_dir", "logs")
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
