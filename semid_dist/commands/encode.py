"""``semid encode``: apply an existing tokenizer to a catalog and export its semantic IDs.

The training run without the scan and the fit: one pass over the catalog encodes (and
validates) every item, then the same dedup, metrics, export and publish-when-complete as
``semid train``. Outputs are the same files (mappings JSON/Parquet, index.json,
training_results.json, and final_model.pt: the tokenizer that produced these IDs).

    semid encode --data_path s3://catalog/items/ --output_dir s3://ids/2026-11-27/ \\
                 --tokenizer s3://models/kmeans-3x256/final_model.pt
"""

from __future__ import annotations

import hashlib
import logging

from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.io.storage import Storage
from semid_dist.pipeline.fit import as_run
from semid_dist.pipeline.ids import export_ids
from semid_dist.run import Run
from semid_dist.tokenizer import read_tokenizer

log = logging.getLogger("semid_dist")


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Encode cfg.data_path with cfg.tokenizer and publish to cfg.output_dir; returns the results."""
    if not cfg.tokenizer:
        raise UserError(
            "encode needs --tokenizer: the final_model.pt of an earlier train run (local path or s3://)"
        )
    tok, raw = read_tokenizer(cfg.tokenizer, Storage.resolve(cfg.s3_endpoint_url, cfg.s3_retry_budget_s))
    sha256 = hashlib.sha256(raw).hexdigest()
    cfg = as_run(cfg, tok)
    with Run(cfg, log_dir) as r:
        catalog, n_items = r.inspect()
        if catalog.dim != tok.input_dim:
            raise UserError(
                f"{cfg.tokenizer}: tokenizer takes {tok.input_dim}-d embeddings, "
                f"but {cfg.data_path} has {catalog.dim}-d embeddings"
            )
        r.publisher(cfg.output_dir)
        where = r.connect()
        log.info(
            "applying %s tokenizer %s (%d levels x %d codes, input dim %d, sha256 %s)",
            tok.mode,
            cfg.tokenizer,
            tok.n_layers,
            tok.n_codes,
            tok.input_dim,
            sha256[:12],
        )
        trained = tok.config if isinstance(tok.config, dict) else {}
        info = {
            "command": "encode",
            "tokenizer": cfg.tokenizer,
            "tokenizer_sha256": sha256,
            # where the tokenizer came from (its own training config names them)
            "trained_on": trained.get("data_path"),
            "trained_output_dir": trained.get("output_dir"),
        }
        return export_ids(r, catalog, n_items, where, tok, info, scanned=False)
