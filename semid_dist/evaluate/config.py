"""``semid evaluate``'s config: every field carries its help, and the CLI is derived from it."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from semid_dist.config import DEVICES, LOG_LEVELS
from semid_dist.errors import UserError
from semid_dist.storage import DEFAULT_RETRY_BUDGET_S

PROTOCOLS = ("loo", "dense")
BASELINES = ("shuffled", "item_tokens", "popularity")
SHUFFLED = ("first", "all")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    # --- what is evaluated, on what ---
    run: list = _f(
        [], "published runs (output dirs or nightly roots, local or s3://) whose IDs are evaluated"
    )
    interactions: str = _f(
        "", "parquet with UserID, ItemID, timestamp (a file, dir of shards, glob or s3://)"
    )
    output_dir: str = _f("", "where evaluation.json and evaluation.html are published (local or s3://)")
    # --- protocol ---
    protocols: str = _f(
        "loo,dense",
        "loo: each user's last item is the test target, the second-last validates; dense: each of "
        "the last --test_last items is a target given the items before it",
    )
    test_last: int = _f(10, "targets per user in the dense protocol")
    max_history: int = _f(20, "items of history the model reads")
    keep_seen: bool = _f(False, "keep items the user has already seen among the recommendations")
    beam_size: int = _f(20, "beams kept per level; only valid IDs come out")
    baselines: str = _f(
        "shuffled,item_tokens,popularity",
        "shuffled: the run's IDs shuffled across items; item_tokens: one token per item; "
        "popularity: the most-interacted items the user has not seen (comma list, or none)",
    )
    shuffled: str = _f("first", "shuffle the first run's IDs, or every run's (all)")
    seeds: int = _f(3, "models trained per run and baseline (seeds --seed, --seed+1, ...)")
    seed: int = _f(42, "the first seed")
    bootstrap: int = _f(1000, "bootstrap replicates over users for the 95%% intervals")
    # --- the model and its training ---
    epochs: int = _f(8, "training epochs (at most; early stopping on validation Recall@10)")
    patience: int = _f(3, "epochs without a better validation Recall@10 before stopping; 0: never")
    batch_size: int = _f(128, "history windows per global batch")
    learning_rate: float = _f(2e-3, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    d_model: int = _f(64, "model width (TIGER: 128)")
    encoder_layers: int = _f(2, "history encoder layers (TIGER: 4)")
    decoder_layers: int = _f(0, "ID decoder layers; 0: a running sum of the chosen codes (TIGER: 4)")
    heads: int = _f(4, "attention heads (TIGER: 6)")
    head_dim: int = _f(16, "dimension per head (TIGER: 64)")
    mlp_dim: int = _f(256, "MLP width (TIGER: 1024)")
    dropout: float = _f(0.1, "dropout")
    # --- cluster ---
    num_workers: int = _f(1, "Ray Train workers")
    cpus_per_worker: float = _f(1.0, "CPUs each worker asks Ray for")
    device: str = _f("auto", "auto, cpu or cuda")
    max_failures: int = _f(0, "restarts allowed after a worker failure")
    resume: bool = _f(False, "continue from the latest checkpoint (models already trained are kept)")
    storage_path: str = _f("", "Ray Train checkpoints; default <output_dir>/.ray_train")
    ray_address: str = _f("", "Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    s3_endpoint_url: str = _f("", "S3 endpoint override (default: AWS_ENDPOINT_URL)")
    s3_retry_budget_s: float = _f(DEFAULT_RETRY_BUDGET_S, "seconds S3 errors are retried before stopping")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR")

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


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(
        prog="semid evaluate",
        description="Train a small generative retriever on published semantic IDs and the users' "
        "interactions; report Recall/NDCG@5/10 against baselines, with paired bootstrap intervals.",
    )
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        tp, h = hints[f.name], f.metadata["help"]
        if f.name == "run":
            p.add_argument("--run", nargs="+", required=True, metavar="RUN", help=h)
        elif tp is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            p.add_argument(f"--{f.name}", type=tp, default=f.default, help=f"{h} (default: {f.default})")
    p.add_argument("--log_dir", default="logs", help="local folder for log files (default: logs)")
    return p
