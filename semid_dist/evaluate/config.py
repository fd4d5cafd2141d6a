"""``semid evaluate``'s config: every field carries its help and its --help section
(semid_dist/options.py), and the CLI is derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from semid_dist.config import DEVICES, LOG_LEVELS
from semid_dist.errors import UserError
from semid_dist.io.retry import DEFAULT_RETRY_BUDGET_S
from semid_dist.options import ArgParser, add_fields, option

PROTOCOLS = ("loo", "dense")
BASELINES = ("shuffled", "item_tokens", "popularity")
SHUFFLED = ("first", "all")


# The sections of `semid evaluate --help`, in order; each field names its own.
GROUPS = {
    "what": "what is evaluated, on what",
    "protocol": "protocol",
    "model": "the model and its training",
    "cluster": "cluster, S3 and logging",
}


def _f(default: Any, help: str, group: str, **kw: Any) -> Any:
    return option(default, help, group=group, commands=("evaluate",), **kw)


@dataclass
class EvalConfig:
    # --- what is evaluated, on what ---
    run: list = _f(
        [],
        "published runs (output dirs or nightly roots, local or s3://) whose IDs are evaluated",
        "what",
        nargs="+",
        required=True,
        metavar="RUN",
    )
    interactions: str = _f(
        "", "parquet with UserID, ItemID, timestamp (a file, dir of shards, glob or s3://)", "what"
    )
    output_dir: str = _f(
        "", "where evaluation.json and evaluation.html are published (local or s3://)", "what"
    )
    # --- protocol ---
    protocols: str = _f(
        "loo,dense",
        "loo: each user's last item is the test target, the second-last validates; dense: each of "
        "the last --test_last items is a target given the items before it",
        "protocol",
    )
    test_last: int = _f(10, "targets per user in the dense protocol", "protocol")
    max_history: int = _f(20, "items of history the model reads", "protocol")
    keep_seen: bool = _f(False, "keep items the user has already seen among the recommendations", "protocol")
    beam_size: int = _f(20, "beams kept per level; only valid IDs come out", "protocol")
    baselines: str = _f(
        "shuffled,item_tokens,popularity",
        "shuffled: the run's IDs shuffled across items; item_tokens: one token per item; "
        "popularity: the most-interacted items the user has not seen (comma list, or none)",
        "protocol",
    )
    shuffled: str = _f("first", "shuffle the first run's IDs, or every run's (all)", "protocol")
    seeds: int = _f(3, "models trained per run and baseline (seeds --seed, --seed+1, ...)", "protocol")
    seed: int = _f(42, "the first seed", "protocol")
    bootstrap: int = _f(1000, "bootstrap replicates over users for the 95%% intervals", "protocol")
    # --- the model and its training ---
    epochs: int = _f(8, "training epochs (at most; early stopping on validation Recall@10)", "model")
    patience: int = _f(3, "epochs without a better validation Recall@10 before stopping; 0: never", "model")
    batch_size: int = _f(128, "history windows per global batch", "model")
    learning_rate: float = _f(2e-3, "AdamW learning rate", "model")
    weight_decay: float = _f(0.01, "AdamW weight decay", "model")
    d_model: int = _f(64, "model width (TIGER: 128)", "model")
    encoder_layers: int = _f(2, "history encoder layers (TIGER: 4)", "model")
    decoder_layers: int = _f(0, "ID decoder layers; 0: a running sum of the chosen codes (TIGER: 4)", "model")
    heads: int = _f(4, "attention heads (TIGER: 6)", "model")
    head_dim: int = _f(16, "dimension per head (TIGER: 64)", "model")
    mlp_dim: int = _f(256, "MLP width (TIGER: 1024)", "model")
    dropout: float = _f(0.1, "dropout", "model")
    # --- cluster, S3 and logging ---
    num_workers: int = _f(1, "Ray Train workers", "cluster")
    cpus_per_worker: float = _f(1.0, "CPUs each worker asks Ray for", "cluster")
    device: str = _f("auto", "auto, cpu or cuda", "cluster")
    max_failures: int = _f(0, "restarts allowed after a worker failure", "cluster")
    resume: bool = _f(
        False, "continue from the latest checkpoint (models already trained are kept)", "cluster"
    )
    storage_path: str = _f("", "Ray Train checkpoints; default <output_dir>/.ray_train", "cluster")
    ray_address: str = _f("", "Ray cluster address (default: RAY_ADDRESS, else a local Ray)", "cluster")
    s3_endpoint_url: str = _f("", "S3 endpoint override (default: AWS_ENDPOINT_URL)", "cluster")
    s3_retry_budget_s: float = _f(
        DEFAULT_RETRY_BUDGET_S, "seconds S3 errors are retried before stopping", "cluster"
    )
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR", "cluster")

    # What Run (semid_dist/run.py) reads of a config: the log's name and first line.
    mode = "evaluate"

    @property
    def data_path(self) -> str:
        return self.interactions

    @property
    def dataset_name(self) -> str:
        p = self.interactions.rstrip("/").split("/")[-1].removesuffix(".parquet") or "interactions"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", p)

    @property
    def protocol_list(self) -> list[str]:
        return _names(self.protocols)

    @property
    def baseline_list(self) -> list[str]:
        return [] if self.baselines.strip() == "none" else _names(self.baselines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return cls(**d).validated()

    def validated(self) -> EvalConfig:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"invalid --{name}={getattr(self, name)!r}: {why}")

        for name in ("run", "interactions", "output_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        for name in ("test_last", "max_history", "beam_size", "seeds", "bootstrap", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("d_model", "encoder_layers", "heads", "head_dim", "mlp_dim", "num_workers"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.decoder_layers < 0 or self.patience < 0 or self.max_failures < 0:
            raise UserError("--decoder_layers, --patience and --max_failures must be >= 0")
        if self.beam_size < 10:
            raise bad("beam_size", "must be >= 10: Recall@10 needs ten recommendations")
        if not set(self.protocol_list) <= set(PROTOCOLS) or not self.protocol_list:
            raise bad("protocols", f"a comma list of {', '.join(PROTOCOLS)}")
        if not set(self.baseline_list) <= set(BASELINES):
            raise bad("baselines", f"a comma list of {', '.join(BASELINES)}, or none")
        if self.shuffled not in SHUFFLED:
            raise bad("shuffled", f"choose one of {', '.join(SHUFFLED)}")
        if self.device not in DEVICES:
            raise bad("device", f"choose one of {', '.join(DEVICES)}")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise UserError("--learning_rate must be > 0 and --weight_decay >= 0")
        if self.cpus_per_worker <= 0 or not self.s3_retry_budget_s > 0:
            raise UserError("--cpus_per_worker and --s3_retry_budget_s must be > 0")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", f"choose one of {', '.join(LOG_LEVELS)}")
        return self


def _names(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog="semid evaluate",
        usage="semid evaluate --run RUN [RUN ...] --interactions PATH --output_dir OUT [flags]",
        description="Train a small generative retriever on published semantic IDs and the users' "
        "interactions; report Recall/NDCG@5/10 against baselines, with paired bootstrap intervals.",
    )
    groups = add_fields(p, EvalConfig, GROUPS, "evaluate")
    groups["cluster"].add_argument(
        "--log_dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="local folder for log files (default: logs)",
    )
    return p
