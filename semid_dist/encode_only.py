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
import io
import logging

from semid_dist import storage, train
from semid_dist.config import Config
from semid_dist.errors import UserError

log = logging.getLogger("semid_dist")


def load(path: str, endpoint_url: str = ""):
    """(Tokenizer, sha256 of the file) from a local path or s3:// URI, honouring the endpoint
    override (load_tokenizer() reads only the standard AWS environment)."""
    import torch

    from semid_dist.tokenizer import Tokenizer

    if not path:
        raise UserError(
            "encode needs --tokenizer: the final_model.pt of an earlier train run (local path or s3://)"
        )
    fs = storage.filesystem(path, endpoint_url)
    try:
        with fs.open(storage.strip_scheme(path), "rb") as f:
            blob = f.read()
    except FileNotFoundError as e:
        raise UserError(f"{path}: tokenizer file does not exist") from e
    except IsADirectoryError as e:
        raise UserError(f"{path}: is a directory; give the final_model.pt file in it") from e
    except Exception as e:
        if storage.is_s3(path):
            raise storage.describe_s3_error(path, e) from e
        raise UserError(f"{path}: cannot read tokenizer: {str(e).strip().splitlines()[0]}") from e
    try:
        payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable tokenizer file ({first})") from e
    try:
        tok = Tokenizer.from_payload(payload)
    except UserError as e:
        raise UserError(f"{path}: {e.args[0]}") from e
    except Exception as e:  # a semid_dist file with missing or mismatched tensors
        raise UserError(
            f"{path}: damaged tokenizer file ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"
        ) from e
    return tok, hashlib.sha256(blob).hexdigest()


def run(cfg: Config, log_dir: str = "logs") -> dict:
    """Encode cfg.data_path with cfg.tokenizer and publish to cfg.output_dir; returns the results."""
    tok, sha256 = load(cfg.tokenizer, cfg.s3_endpoint_url)
    # The run's config describes the tokenizer actually applied, whatever the flags said.
    sizes = {"n_embed" if tok.mode == "tiger" else "n_clusters": tok.n_codes}
    if tok.mode == "tiger" and "latent_dim" in tok.model_args:
        sizes["latent_dim"] = int(tok.model_args["latent_dim"])
    cfg = cfg.replace(mode=tok.mode, n_layers=tok.n_layers, **sizes)

    def fit(cfg_: Config, ds, info, scan, n_items: int, pub) -> tuple:
        if info.dim != tok.input_dim:
            raise UserError(
                f"{cfg.tokenizer}: tokenizer takes {tok.input_dim}-d embeddings, "
                f"but {cfg.data_path} has {info.dim}-d embeddings"
            )
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
        return tok, {
            "command": "encode",
            "tokenizer": cfg.tokenizer,
            "tokenizer_sha256": sha256,
            # where the tokenizer came from (its own training config names them)
            "trained_on": trained.get("data_path"),
            "trained_output_dir": trained.get("output_dir"),
        }

    return train.execute(cfg, log_dir, fit=fit, scan_first=False)
