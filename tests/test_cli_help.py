"""The command line as a user meets it: `semid --help` lists the sub-commands, each sub-command's
--help lists its own flags in groups built from the Config fields' metadata, and the roles the
fields carry (tiger run identity, recorded hyperparameters) are what the trainer uses. No Ray."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from semid_dist import cli
from semid_dist.config import ALL, GROUPS, Config
from semid_dist.evaluate.config import EvalConfig
from semid_dist.options import hyperparameters, option, run_fields

SUBCOMMANDS = ("train", "encode", "nightly", "evaluate", "report", "inspect")
NIGHTLY_ONLY = ("--generation", "--retrain", "--changed_policy")
EVALUATE_ONLY = ("--interactions", "--protocols", "--baselines", "--d_model", "--bootstrap")
# What named a tiger run's checkpoint folder, and what training_results.json recorded, before
# both were derived from the fields: the derivation must keep them (the order of the second too).
RUN_FIELDS_BEFORE = {
    "data_path",
    "max_items",
    "n_layers",
    "n_embed",
    "latent_dim",
    "batch_size",
    "learning_rate",
    "use_ema",
    "beta",
    "ema_decay",
    "dead_code_threshold",
    "gumbel",
    "gumbel_temperature",
    "gumbel_temperature_min",
    "val_fraction",
    "seed",
    "max_iters",
    "kmeans_progressive",
}
HYPERPARAMETERS_BEFORE = (
    "epochs",
    "batch_size",
    "learning_rate",
    "n_layers",
    "n_embed",
    "latent_dim",
    "use_ema",
    "beta",
    "ema_decay",
    "dead_code_threshold",
    "gumbel",
    "gumbel_temperature",
    "gumbel_temperature_min",
    "patience",
    "val_fraction",
    "seed",
    "max_iters",
    "num_workers",
)


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal: one line per flag


def help_of(capsys, argv: list[str]) -> str:
    """What `semid ARGV` prints (it must exit 0)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    assert rc in (0, None), out.err
    return out.out


def sections(text: str) -> dict[str, str]:
    """argparse help split at its section titles ('kmeans mode (...):' at column 0)."""
    parts: dict[str, str] = {}
    title = ""
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            title = line[:-1]
            parts[title] = ""
        else:
            parts[title] = parts.get(title, "") + line + "\n"
    return parts


def flags_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", text))


def test_top_help_lists_the_subcommands_not_the_flags(capsys):
    out = help_of(capsys, ["--help"])
    listed = sections(out)["commands"]
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {name}\s+\S", listed, re.M), (name, listed)
    assert "no command mean train" in out
    assert not {"--n_clusters", "--epochs", "--kmeans_fit", "--generation", "--log_dir"} & flags_in(out)
    assert len(flags_in(out)) < 8  # the usage example, not train's 60 flags
    assert help_of(capsys, ["-h"]) == out


def test_top_help_from_the_entry_point():
    proc = subprocess.run([sys.executable, "-m", "semid_dist", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in SUBCOMMANDS)


def test_train_help_groups_its_own_flags(capsys):
    out = help_of(capsys, ["train", "--help"])
    parts = sections(out)
    assert {"input and output", GROUPS["kmeans"], GROUPS["tiger"], "IDs", "cluster and S3", "logging"} <= set(
        parts
    )
    assert {"--n_clusters", "--kmeans_fit", "--beam_size"} <= flags_in(parts[GROUPS["kmeans"]])
    assert {"--epochs", "--n_embed", "--use_ema", "--no_ema", "--resume"} <= flags_in(parts[GROUPS["tiger"]])
    assert {"--collision_policy", "--relocate_candidates"} <= flags_in(parts["IDs"])
    assert {"--data_path", "--output_dir"} <= flags_in(parts["input and output"])
    assert "--log_dir" in flags_in(parts["logging"])
    shown = flags_in(out)
    assert not set(NIGHTLY_ONLY + EVALUATE_ONLY + ("--tokenizer",)) & shown
    # the original tool's defaults, shown
    assert re.search(r"--n_layers N\s+number of quantization levels \(default: 4\)", out)
    assert "(default: tiger)" in out and "(default: 512)" in out
    # flags with no sub-command mean train: the same help
    assert help_of(capsys, ["--data_path", "x", "--help"]) == out


def test_encode_and_nightly_help_show_only_theirs(capsys):
    encode = flags_in(help_of(capsys, ["encode", "--help"]))
    assert {"--tokenizer", "--data_path", "--output_dir", "--collision_policy", "--device"} <= encode
    assert not {"--epochs", "--n_clusters", "--mode", "--kmeans_fit", *NIGHTLY_ONLY} & encode
    nightly = flags_in(help_of(capsys, ["nightly", "--help"]))
    assert {*NIGHTLY_ONLY, "--tokenizer", "--n_clusters", "--epochs", "--mode"} <= nightly
    assert not set(EVALUATE_ONLY) & nightly


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_no_empty_default_in_any_help(capsys, command):
    out = help_of(capsys, [command, "--help"])
    assert "(default: )" not in out and "(default: None)" not in out and "(default: [])" not in out
    assert out.startswith(f"usage: semid {command}") or out.startswith("usage: semid [train]")


def test_evaluate_help_is_grouped_without_train_flags(capsys):
    out = help_of(capsys, ["evaluate", "--help"])
    parts = sections(out)
    assert "--run" in flags_in(parts["what is evaluated, on what"])
    assert {"--d_model", "--dropout"} <= flags_in(parts["the model and its training"])
    assert not {"--n_clusters", "--mode", "--generation", "--tokenizer"} & flags_in(out)


def test_every_config_field_documents_its_roles():
    known = set(ALL)
    for f in dataclasses.fields(Config):
        m = f.metadata
        assert m["help"].strip(), f.name
        assert m["group"] in GROUPS, f.name
        assert m["commands"] and set(m["commands"]) <= known, f.name
        if m["defines_run"] or m["hyperparameter"] is not None:
            assert "train" in m["commands"], f.name
    for f in dataclasses.fields(EvalConfig):
        assert f.metadata["help"].strip() and f.metadata["commands"] == ("evaluate",), f.name


def test_run_fields_and_hyperparameters_are_derived_from_the_fields():
    from semid_dist.tiger import trainer

    marked = {f.name for f in dataclasses.fields(Config) if f.metadata["defines_run"]}
    assert set(trainer.RUN_FIELDS) == marked == RUN_FIELDS_BEFORE
    assert trainer.HYPERPARAMETERS == HYPERPARAMETERS_BEFORE

    @dataclasses.dataclass
    class Wider(Config):  # a field added with these roles is picked up
        dropout: float = option(0.0, "dropout", group="tiger", commands=("train",), defines_run=True)
        warmup: int = option(0, "warmup epochs", group="tiger", commands=("train",), hyperparameter=18)

    assert "dropout" in run_fields(Wider) and "warmup" not in run_fields(Wider)
    assert hyperparameters(Wider) == (*HYPERPARAMETERS_BEFORE, "warmup")


def test_run_name_follows_the_run_fields():
    from semid_dist.tiger.trainer import run_name

    base = Config(data_path="d", output_dir="o", mode="tiger")
    name = run_name(base, 16, 100)
    assert run_name(base.replace(ema_decay=0.9), 16, 100) != name  # defines the run
    assert run_name(base.replace(kmeans_progressive=False), 16, 100) != name
    assert run_name(base.replace(epochs=7, num_workers=3, patience=0), 16, 100) == name  # does not


def test_every_field_is_accepted_by_every_command():
    """A flag not listed in a sub-command's help still parses there (scripts keep working)."""
    for command in ("train", "encode", "nightly"):
        cfg, extra = cli.parse_config(
            [
                command,
                "--data_path",
                "d",
                "--output_dir",
                "o",
                "--epochs",
                "3",
                "--generation",
                "g1",
                "--no_ema",
            ]
        )
        assert extra == {"log_dir": "logs", "command": command}
        assert (cfg.epochs, cfg.generation, cfg.use_ema) == (3, "g1", False)


def test_bare_flags_and_config_file_mean_train(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("mode: kmeans\nn_clusters: 8\ndata_path: d\noutput_dir: o\n")
    cfg, extra = cli.parse_config(["--config", str(cfg_file), "--n_clusters", "12", "--log_dir", "L"])
    assert extra == {"log_dir": "L", "command": "train"}
    assert (cfg.mode, cfg.n_clusters, cfg.n_layers, cfg.data_path) == ("kmeans", 12, 4, "d")
    assert (
        cli.parse_config(["train", "--config", str(cfg_file)])[0]
        == cli.parse_config(["--config", str(cfg_file)])[0]
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bogus"], "unknown command 'bogus'"),
        (["train", "--n_layers", "abc"], "--n_layers: invalid int value"),
        (["--data_path", "d", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["evaluate", "--interactions", "i"], "--run"),
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("semid: error:") and expected in err[0], err
