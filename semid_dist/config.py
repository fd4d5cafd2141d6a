"""One typed config, validated in one place.

The CLI maps onto it field for field (the original tool's flag names and defaults); ``--config`` files
(YAML or JSON) set the same fields; Ray workers receive ``to_dict()`` and rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from semid_dist.errors import UserError, one_line
from semid_dist.options import option

MODES = ("tiger", "kmeans")
CODES_FIELD = {"tiger": "n_embed", "kmeans": "n_clusters"}  # each mode's codes-per-level flag
DEVICES = ("auto", "cpu", "cuda")
KMEANS_FITS = ("auto", "sample", "stream")
KEEP_MODELS = ("best", "last")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CHANGED_POLICIES = ("keep_if_same_codes", "reassign")  # == math.generations.POLICIES
COLLISION_POLICIES = ("suffix", "relocate")  # math/relocate.py
GENERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# The sub-commands whose --help lists a field: nightly fits a tokenizer as train does (with
# --retrain, or on a first night without --tokenizer); encode applies an existing one.
ALL = ("train", "encode", "nightly")
FIT = ("train", "nightly")
# The sections of --help, in order; a field's group is one of these keys.
GROUPS = {
    "io": "input and output",
    "both": "tokenizer (both modes)",
    "kmeans": "kmeans mode (residual k-means)",
    "tiger": "tiger mode (RQ-VAE trained with Ray Train)",
    "ids": "IDs",
    "apply": "existing tokenizer (encode, nightly)",
    "nightly": "nightly generations",
    "cluster": "cluster and S3",
    "logging": "logging",
}


def _opt(default: Any, help: str, group: str, commands: tuple[str, ...] = FIT, **roles: Any) -> Any:
    return option(default, help, group=group, commands=commands, **roles)


def _gb_or_auto(value: Any) -> bool:
    if value == "auto":
        return True
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


@dataclass
class Config:
    # --- the original tool's contract (its flag names and defaults) ---
    data_path: str = _opt(
        "",
        "parquet input: a dir with item_emb.parquet, a file, a dir of shards, a glob, or s3:// (required)",
        "io",
        ALL,
        defines_run=True,
    )
    output_dir: str = _opt(
        "", "where results are published: local path or s3:// prefix (required)", "io", ALL
    )
    mode: str = _opt("tiger", "tiger (RQ-VAE) or kmeans (residual k-means)", "both")
    epochs: int = _opt(100, "training epochs", "tiger", hyperparameter=0)
    batch_size: int = _opt(512, "global training batch size", "tiger", defines_run=True, hyperparameter=1)
    learning_rate: float = _opt(1e-3, "AdamW learning rate", "tiger", defines_run=True, hyperparameter=2)
    device: str = _opt(
        "auto",
        "auto, cpu or cuda: where tiger trains, items are encoded and the kmeans fit runs",
        "cluster",
        ALL,
    )
    n_layers: int = _opt(4, "number of quantization levels", "both", defines_run=True, hyperparameter=3)
    n_embed: int = _opt(512, "codes per level", "tiger", defines_run=True, hyperparameter=4)
    n_clusters: int = _opt(512, "codes per level", "kmeans")
    latent_dim: int = _opt(128, "latent dimension", "tiger", defines_run=True, hyperparameter=5)
    max_items: int | None = _opt(
        None, "use only the first N items (quick tests)", "io", ALL, defines_run=True
    )
    save_every: int = _opt(10, "checkpoint every N epochs", "tiger")
    log_level: str = _opt(
        "INFO", "DEBUG, INFO, WARNING or ERROR (DEBUG also shows tracebacks)", "logging", ALL
    )
    use_ema: bool = _opt(
        True,
        "EMA codebook updates",
        "tiger",
        defines_run=True,
        hyperparameter=6,
        negative=("no_ema", "learn codebooks by gradient"),
    )
    max_iters: int = _opt(
        20,
        "Lloyd iterations per level at full dimension (also tiger's k-means codebook init)",
        "kmeans",
        defines_run=True,
        hyperparameter=16,
    )
    # --- kmeans mode ---
    seed: int = _opt(
        42, "random seed (sampling, k-means seeding, model init)", "both", defines_run=True, hyperparameter=15
    )
    sample_per_centroid: int = _opt(256, "k-means sample size = this x n_clusters", "kmeans")
    kmeans_sample_gb: float = _opt(
        1.0,
        "at most this many GB of k-means sample in memory; a larger sample is cut to it, with a warning",
        "kmeans",
    )
    kmeans_progressive: bool = _opt(
        True,
        "progressive-dimension k-means, math/kmeans.py (also tiger's k-means codebook init)",
        "kmeans",
        defines_run=True,
    )
    kmeans_full_dim_levels: int = _opt(
        0,
        "fit the first N levels in the full dimension, not progressively: "
        "lower reconstruction error, more collisions on real catalogs",
        "kmeans",
    )
    kmeans_fit: str = _opt(
        "auto",
        "sample: fit on the hash sample; stream: then refine with full passes over every item, spread "
        "over the cluster; auto: stream when --kmeans_sample_gb would cut the sample",
        "kmeans",
    )
    kmeans_stream_passes: int = _opt(
        2, "at most this many full-catalog Lloyd passes after the sample fit (stream)", "kmeans"
    )
    beam_size: int = _opt(
        1,
        "encode with beam search, keeping this many code paths per level (1: greedy); stored with the "
        "tokenizer, so encode, nightly and the API apply it",
        "kmeans",
    )
    # --- both modes: IDs ---
    collision_policy: str = _opt(
        "suffix",
        "suffix: items sharing all L codes get a dedup code 1, 2, ...; relocate: the one nearest its "
        "codes keeps them, the others move to free last-level codes under the same prefix when one "
        "is among their candidates (math/relocate.py)",
        "ids",
        ALL,
    )
    relocate_candidates: int = _opt(
        16, "last-level candidates per item kept by the encode pass (relocate)", "ids", ALL
    )
    relocate_task_rows: int = _opt(
        250_000,
        "items per relocation task (relocate): each Ray task relocates about this many items, whole "
        "prefixes; the IDs do not depend on it",
        "ids",
        ALL,
    )
    # --- tiger mode ---
    beta: float = _opt(0.25, "commitment loss weight", "tiger", defines_run=True, hyperparameter=7)
    ema_decay: float = _opt(0.99, "EMA codebook decay", "tiger", defines_run=True, hyperparameter=8)
    dead_code_threshold: float = _opt(
        0.25, "EMA rows per step below which a code is restarted", "tiger", defines_run=True, hyperparameter=9
    )
    gumbel: bool = _opt(
        False, "Gumbel-softmax code assignment (needs --no_ema)", "tiger", defines_run=True, hyperparameter=10
    )
    gumbel_temperature: float = _opt(
        1.0,
        "Gumbel-softmax temperature at the first epoch, decayed to --gumbel_temperature_min at the last",
        "tiger",
        defines_run=True,
        hyperparameter=11,
    )
    gumbel_temperature_min: float = _opt(
        0.1, "Gumbel-softmax temperature at the last epoch", "tiger", defines_run=True, hyperparameter=12
    )
    patience: int = _opt(
        10,
        "early stopping after N epochs without a lower validation error; 0: never",
        "tiger",
        hyperparameter=13,
    )
    keep_model: str = _opt(
        "best",
        "best: publish the evaluation epoch with the lowest validation reconstruction error "
        "(then the lower collision rate); last: the last epoch (modes/tiger.py)",
        "tiger",
    )
    eval_every: int = _opt(
        10,
        "encode every item for the collision rate, code usage and reconstruction error every N "
        "epochs and at the last; the validation error is logged every epoch (tiger/steps.py)",
        "tiger",
    )
    val_fraction: float = _opt(
        0.05, "share of items held out for validation", "tiger", defines_run=True, hyperparameter=14
    )
    num_workers: int = _opt(1, "Ray Train workers", "tiger", hyperparameter=17)
    train_sample_gb: str = _opt(
        "auto",
        "at most this many GB of the catalog in the train workers' memory: tiger then trains on a "
        "hash sample of that size (kmeans's rule) and still encodes every item; auto: the whole "
        "catalog when it fits the memory Ray gives the workers, else the largest sample that fits",
        "tiger",
        metavar="GB|auto",
    )
    cpus_per_worker: float = _opt(0.5, "CPUs each Ray Train worker asks for", "tiger")
    resume: bool = _opt(False, "continue from the latest checkpoint", "tiger")
    max_failures: int = _opt(0, "restarts allowed after a worker failure", "tiger")
    storage_path: str = _opt("", "Ray Train checkpoints (default: <output_dir>/.ray_train)", "tiger")
    # --- data and cluster ---
    ray_address: str = _opt(
        "", "Ray cluster address (default: RAY_ADDRESS, else a local Ray)", "cluster", ALL
    )
    s3_endpoint_url: str = _opt("", "S3 endpoint override (default: AWS_ENDPOINT_URL)", "cluster", ALL)
    s3_retry_budget_s: float = _opt(
        120.0, "seconds S3 errors are retried before the run stops with an error", "cluster", ALL
    )
    encode_batch_size: int = _opt(
        16384,
        "rows per batch for each GPU encoder actor (CPU passes stream 4,096-row blocks)",
        "cluster",
        ALL,
    )
    item_titles: str = _opt("", "parquet with ItemID,title shown in the summary", "io", ALL)
    examples: int = _opt(5, "items sharing a prefix shown in the summary", "io", ALL)
    # --- encode / nightly ---
    tokenizer: str = _opt(
        "",
        "an existing final_model.pt (local or s3://) to apply: encode needs it; nightly uses it "
        "instead of the previous generation's",
        "apply",
        ("encode", "nightly"),
    )
    # --- nightly ---
    generation: str = _opt(
        "", "name of tonight's generation (default: today's UTC date, YYYY-MM-DD)", "nightly", ("nightly",)
    )
    retrain: bool = _opt(
        False,
        "fit a new tokenizer instead of reusing the previous generation's (unchanged items still keep "
        "their IDs)",
        "nightly",
        ("nightly",),
    )
    changed_policy: str = _opt(
        "keep_if_same_codes",
        "keep_if_same_codes or reassign, for items whose embedding changed (math/generations.py)",
        "nightly",
        ("nightly",),
    )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d).validated()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> "Config":
        return dataclasses.replace(self, **kw).validated()

    @property
    def n_codes(self) -> int:
        """Codes per level for the active mode (--n_embed for tiger, --n_clusters for kmeans)."""
        return getattr(self, CODES_FIELD[self.mode])

    @property
    def dataset_name(self) -> str:
        """Name used in the log file: the data directory's (or file's stem) last component."""
        p = self.data_path.rstrip("/").split("/")[-1] or "data"
        for suffix in (".parquet",):
            if p.endswith(suffix):
                p = p[: -len(suffix)]
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p) or "data"

    def validated(self) -> "Config":
        def bad(name: str, why: str) -> UserError:
            return UserError(f"invalid --{name}={getattr(self, name)!r}: {why}")

        if not self.data_path:
            raise UserError("--data_path is required")
        if not self.output_dir:
            raise UserError("--output_dir is required")
        if self.mode not in MODES:
            raise bad("mode", f"choose one of {', '.join(MODES)}")
        if self.device not in DEVICES:
            raise bad("device", f"choose one of {', '.join(DEVICES)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise bad("log_level", f"choose one of {', '.join(LOG_LEVELS)}")
        self.log_level = self.log_level.upper()
        positive = (
            "epochs",
            "batch_size",
            "n_layers",
            "n_embed",
            "n_clusters",
            "latent_dim",
            "save_every",
            "eval_every",
            "max_iters",
            "sample_per_centroid",
            "num_workers",
            "encode_batch_size",
            "kmeans_stream_passes",
            "beam_size",
            "relocate_candidates",
            "relocate_task_rows",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if not self.kmeans_sample_gb > 0:
            raise bad("kmeans_sample_gb", "must be > 0")
        if self.kmeans_full_dim_levels < 0:
            raise bad("kmeans_full_dim_levels", "must be >= 0")
        if self.kmeans_fit not in KMEANS_FITS:
            raise bad("kmeans_fit", f"choose one of {', '.join(KMEANS_FITS)}")
        if self.beam_size > 64:
            raise bad("beam_size", "must be <= 64")
        if self.max_items is not None and self.max_items < 1:
            raise bad("max_items", "must be >= 1")
        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0")
        if not 0 < self.ema_decay < 1:
            raise bad("ema_decay", "must be in (0, 1)")
        if not _gb_or_auto(self.train_sample_gb):
            raise bad("train_sample_gb", "must be a number of GB > 0, or auto")
        if not 0 <= self.val_fraction < 0.5:
            raise bad("val_fraction", "must be in [0, 0.5)")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", "must be > 0")
        if self.max_failures < 0 or self.patience < 0:
            raise UserError("--max_failures and --patience must be >= 0")
        if self.gumbel and self.use_ema:
            raise UserError("--gumbel needs --no_ema (codebooks learned by gradient)")
        if self.n_codes > 65535:
            raise bad(CODES_FIELD[self.mode], "must be <= 65535")
        if self.generation and not GENERATION_NAME.fullmatch(self.generation):
            raise bad(
                "generation",
                "use letters, digits, '.', '_' or '-' (up to 128, not starting with '.', '_' or '-')",
            )
        if self.keep_model not in KEEP_MODELS:
            raise bad("keep_model", f"choose one of {', '.join(KEEP_MODELS)}")
        if self.collision_policy not in COLLISION_POLICIES:
            raise bad("collision_policy", f"choose one of {', '.join(COLLISION_POLICIES)}")
        if self.relocate_candidates > 1024:
            raise bad("relocate_candidates", "must be <= 1024")
        if not self.s3_retry_budget_s > 0:
            raise bad("s3_retry_budget_s", "must be > 0")
        if self.changed_policy not in CHANGED_POLICIES:
            raise bad("changed_policy", f"choose one of {', '.join(CHANGED_POLICIES)}")
        return self


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of Config fields."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # parse errors from either library
        raise UserError(f"{path}: cannot parse config: {one_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: config must be a mapping of field: value")
    return data
