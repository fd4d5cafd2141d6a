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

MODES = ("tiger", "kmeans")
DEVICES = ("auto", "cpu", "cuda")
KMEANS_FITS = ("auto", "sample", "stream")
KEEP_MODELS = ("best", "last")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CHANGED_POLICIES = ("keep_if_same_codes", "reassign")  # == math.generations.POLICIES
COLLISION_POLICIES = ("suffix", "relocate")  # math/relocate.py
GENERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class Config:
    # --- the original tool's contract (its flag names and defaults) ---
    data_path: str = ""
    output_dir: str = ""
    mode: str = "tiger"
    epochs: int = 100
    batch_size: int = 512
    learning_rate: float = 1e-3
    device: str = "auto"
    n_layers: int = 4
    n_embed: int = 512
    n_clusters: int = 512
    latent_dim: int = 128
    max_items: int | None = None
    save_every: int = 10
    log_level: str = "INFO"
    use_ema: bool = True
    max_iters: int = 20
    # --- kmeans mode ---
    seed: int = 42
    sample_per_centroid: int = 256  # k-means sample = this x n_clusters points
    kmeans_sample_gb: float = 1.0  # at most this many GB of sample in the driver (modes.kmeans.sample_target)
    kmeans_progressive: bool = True  # progressive-dimension k-means (see math/kmeans.py)
    kmeans_full_dim_levels: int = 0  # top levels fitted in the full dimension (math/kmeans.py)
    kmeans_fit: str = "auto"  # sample | stream | auto: stream when the sample would be cut (modes/kmeans.py)
    kmeans_stream_passes: int = 2  # at most this many full-catalog Lloyd passes (stream)
    beam_size: int = 1  # paths kept per level when encoding (kmeans; 1: greedy, math/beam.py)
    # --- both modes: IDs ---
    collision_policy: str = "suffix"  # suffix | relocate (math/relocate.py)
    relocate_candidates: int = 16  # last-level candidates per item the encode pass keeps (relocate)
    # --- tiger mode ---
    beta: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.25  # EMA rows per step; below it a code is restarted
    gumbel: bool = False
    gumbel_temperature: float = 1.0
    gumbel_temperature_min: float = 0.1
    patience: int = 10  # early stopping on the validation split; 0 disables it
    keep_model: str = "best"  # best | last: which evaluation epoch's model is published (tiger/trainer.py)
    eval_every: int = 10  # metrics over all items every N epochs and at the last (tiger/steps.py)
    val_fraction: float = 0.05
    num_workers: int = 1
    cpus_per_worker: float = 0.5
    resume: bool = False
    max_failures: int = 0
    storage_path: str = ""  # Ray Train checkpoints; default <output_dir>/.ray_train
    # --- data and cluster ---
    ray_address: str = ""  # empty: RAY_ADDRESS or a local single-node Ray
    s3_endpoint_url: str = ""  # overrides AWS_ENDPOINT_URL
    s3_retry_budget_s: float = 120.0  # how long S3 errors are retried before the run gives up
    encode_batch_size: int = 16384
    item_titles: str = ""  # optional parquet (ItemID, title) shown in the run summary
    examples: int = 5
    # --- encode / nightly ---
    tokenizer: str = ""  # an existing final_model.pt (local or s3://) to apply instead of training
    # --- nightly ---
    generation: str = ""  # name of tonight's generation; empty: today's UTC date (YYYY-MM-DD)
    retrain: bool = False  # fit a new tokenizer tonight (unchanged items still keep their IDs)
    changed_policy: str = "keep_if_same_codes"  # or "reassign" (see semid_dist/math/generations.py)

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
        return self.n_embed if self.mode == "tiger" else self.n_clusters

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
        if not 0 <= self.val_fraction < 0.5:
            raise bad("val_fraction", "must be in [0, 0.5)")
        if self.cpus_per_worker <= 0:
            raise bad("cpus_per_worker", "must be > 0")
        if self.max_failures < 0 or self.patience < 0:
            raise UserError("--max_failures and --patience must be >= 0")
        if self.gumbel and self.use_ema:
            raise UserError("--gumbel needs --no_ema (codebooks learned by gradient)")
        if self.n_codes > 65535:
            raise bad("n_embed" if self.mode == "tiger" else "n_clusters", "must be <= 65535")
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
