"""Config fields that document themselves, and the command line read from them.

A field of ``Config`` (semid_dist/config.py) or ``EvalConfig`` (semid_dist/evaluate/config.py) is
declared with ``option(default, help, ...)``, which keeps its help and its roles in the field's
metadata:

- ``group``: the section of ``--help`` it is listed under (a key of the parser's groups);
- ``commands``: the sub-commands whose ``--help`` lists it (train, encode, nightly);
- ``defines_run``: tiger: it changes what is trained, so it names the run's checkpoint folder
  and ``--resume`` continues only a run with the same value (``run_fields``);
- ``hyperparameter``: tiger: its place in training_results.json's hyperparameters block
  (``hyperparameters``);
- ``negative``: a boolean shown as a pair of flags, ``--name`` and ``--negative`` (``--use_ema`` /
  ``--no_ema``); other booleans get ``--name`` / ``--no-name``.

The parsers, their help and the lists derived from the roles all read these fields, so a new
field is documented and classified where it is declared.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    group: str = "",
    commands: tuple[str, ...] = (),
    defines_run: bool = False,
    hyperparameter: int | None = None,
    **flag: Any,
) -> Any:
    """A dataclass field whose metadata carries its help and roles; ``flag`` holds argparse
    keywords (nargs, required, metavar) and ``negative=(name, help)`` for a pair of flags."""
    meta = {
        "help": help,
        "group": group,
        "commands": tuple(commands),
        "defines_run": defines_run,
        "hyperparameter": hyperparameter,
        "flag": flag,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def run_fields(cls: type) -> tuple[str, ...]:
    """The fields whose role says they define a tiger run, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("defines_run"))


def hyperparameters(cls: type) -> tuple[str, ...]:
    """The fields recorded as tiger hyperparameters, in their recorded order."""
    ranked = [(f.metadata.get("hyperparameter"), f.name) for f in dataclasses.fields(cls)]
    return tuple(name for rank, name in sorted(r for r in ranked if r[0] is not None))


def applies(f: dataclasses.Field, command: str | None) -> bool:
    return command is None or command in f.metadata.get("commands", ())


class ArgParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, ``semid: error: ...``, exit 2, like the other commands."""

    def error(self, message: str):
        where = "" if self.prog == "semid" else f"{self.prog}: "
        print(f"semid: error: {where}{message}", file=sys.stderr)
        sys.exit(2)


def help_text(f: dataclasses.Field) -> str:
    """The field's help and its default; no default is shown where there is none to show (an
    empty string, None, an empty list) or where the help already says it."""
    h = f.metadata["help"]
    d = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if "(default" in h or d in ("", None, []):
        return h
    shown = ("on" if d else "off") if isinstance(d, bool) else str(d).replace("%", "%%")
    return f"{h} (default: {shown})"


def add_fields(
    parser: argparse.ArgumentParser, cls: type, groups: dict[str, str], command: str | None = None
) -> dict[str, argparse._ArgumentGroup]:
    """A flag per field of cls, in argument groups (titles from groups, in that order). Fields
    that do not apply to command are still accepted, but not listed. No flag has a default in
    the namespace: only the flags given are there. Returns the groups by key."""
    sections = {key: parser.add_argument_group(title) for key, title in groups.items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        shown = applies(f, command)
        where = sections.get(f.metadata.get("group", ""), parser) if shown else parser
        _add_flag(where, f, hints[f.name], shown)
    return sections


def _add_flag(where, f: dataclasses.Field, tp: Any, shown: bool) -> None:
    kw = dict(f.metadata.get("flag", {}))
    negative = kw.pop("negative", None)
    h = help_text(f) if shown else argparse.SUPPRESS
    common = {"dest": f.name, "default": argparse.SUPPRESS}
    if tp is bool and negative:
        on = f.metadata["help"] + (" (default)" if f.default else "")
        where.add_argument(f"--{f.name}", action="store_true", help=on if shown else h, **common)
        off = negative[1] + ("" if f.default else " (default)")
        where.add_argument(f"--{negative[0]}", action="store_false", help=off if shown else h, **common)
    elif tp is bool:
        where.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=h, **common)
    else:
        kind = _scalar(tp)
        kw.setdefault("metavar", {int: "N", float: "X"}.get(kind, f.name.upper()))
        where.add_argument(f"--{f.name}", type=kind, help=h, **common, **kw)


def _scalar(tp: Any) -> type:
    """The type argparse converts a value to: int, float or str (``int | None`` -> int, a list -> str)."""
    if tp in (int, float, str):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else str
