"""The Python API: load a trained tokenizer and turn embeddings into codes.

    >>> from semid_dist import load_tokenizer
    >>> tok = load_tokenizer("output/films/final_model.pt")
    >>> codes_NL = tok.encode(embeddings_ND)      # (N, n_layers) int64, before dedup

``final_model.pt`` holds only tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: opening a file someone hands you runs no code.
"""

from __future__ import annotations

import importlib
import io
from typing import Any

import numpy as np
import torch

from semid_dist.errors import UserError, one_line
from semid_dist.io.storage import Storage

FORMAT = "semid_dist/v1"


class _ByMode(type):
    """``Tokenizer(mode, config, ...)`` builds that mode's type (``Tokenizer("kmeans", config,
    codebooks_LKD=...)``); the types themselves are built as usual."""

    def __call__(cls, *args, **kwargs):
        if cls is Tokenizer and args and isinstance(args[0], str):
            return tokenizer_type(args[0])(*args[1:], **kwargs)
        return super().__call__(*args, **kwargs)


class Tokenizer(metaclass=_ByMode):
    """A residual-quantization tokenizer. One type per mode, next to the mode's fit in modes/
    (modes/kmeans.py: KmeansTokenizer, modes/tiger.py: TigerTokenizer); the encode pass, dedup,
    export, ``semid encode`` and the nightly job use this interface only.

    A mode's type has ``mode`` (its name in modes.MODES) and implements the methods that raise
    NotImplementedError here: the sizes, ``to``, ``encode_with_error``, ``decode``,
    ``last_level_candidates`` (the relocate policy), and for serialisation ``tensors`` and
    ``from_tensors`` (final_model.pt), ``config_sizes`` and ``fingerprint_parts``."""

    mode = ""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    # --- sizes and placement ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        raise NotImplementedError

    @property
    def n_codes(self) -> int:
        raise NotImplementedError

    @property
    def input_dim(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Tokenizer":
        """Move the codebooks/model to a device (encode then runs there)."""
        raise NotImplementedError

    # --- encoding ---------------------------------------------------------------------------
    def _as_tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
            if not x.flags.writeable:  # e.g. a zero-copy view of an Arrow block: torch wants to own it
                x = x.copy()
        x_ND = torch.as_tensor(x)
        if x_ND.ndim != 2 or x_ND.shape[1] != self.input_dim:
            raise UserError(f"expected embeddings of shape (N, {self.input_dim}), got {tuple(x_ND.shape)}")
        return x_ND.to(self.device, torch.float32)

    def encode_with_error(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, L) and the squared reconstruction error of every row."""
        raise NotImplementedError

    def encode(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.encode_with_error(x)[0]

    def decode(self, codes_NL: np.ndarray | torch.Tensor) -> np.ndarray:
        """The reconstruction of the given codes."""
        raise NotImplementedError

    def last_level_candidates(
        self, x: np.ndarray | torch.Tensor, codes_NL: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's own last code and its k-1 nearest other last-level codes under the same
        first L-1 codes ((N, k) int32, own code first), with the squared reconstruction error
        each would give (float32): math/relocate.py."""
        raise NotImplementedError

    def cpu_encoder(self):
        """What the encode pass's CPU tasks hold: encode_with_error and last_level_candidates
        over numpy rows (catalog/encode.py). Itself, unless the mode has a lighter form."""
        return self

    # --- serialisation ----------------------------------------------------------------------
    def tensors(self) -> dict[str, Any]:
        """What final_model.pt holds besides format, mode and config: tensors, numbers and
        strings only, so that it loads with ``torch.load(weights_only=True)``."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, config: dict[str, Any], payload: dict[str, Any]) -> "Tokenizer":
        """The tokenizer of a payload that tensors() wrote."""
        raise NotImplementedError

    def config_sizes(self) -> dict[str, int]:
        """The Config fields this tokenizer fixes besides mode and n_layers (its code count, ...),
        for a run that applies it (``semid encode``, ``semid nightly``)."""
        raise NotImplementedError

    def fingerprint_parts(self) -> tuple[bytes, dict[str, torch.Tensor]]:
        """What makes the codes, for lineage.tokenizer_fingerprint: the architecture (bytes;
        empty when the tensors' shapes say it all) and every tensor by name."""
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        return {"format": FORMAT, "mode": self.mode, "config": self.config, **self.tensors()}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "Tokenizer":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise UserError("not a semid_dist tokenizer file (missing format marker)")
        return tokenizer_type(payload["mode"]).from_tensors(payload["config"], payload)


def tokenizer_type(mode: str) -> type[Tokenizer]:
    """The Tokenizer type of a mode: TOKENIZER in the mode's module (modes.MODES)."""
    from semid_dist.modes import MODES

    if mode not in MODES:
        raise UserError(f"unknown tokenizer mode {mode!r}")
    return importlib.import_module(MODES[mode]).TOKENIZER


def tokenizer_from_bytes(raw: bytes, where: str) -> Tokenizer:
    """The Tokenizer in a final_model.pt's bytes, loaded with ``weights_only=True``; where names
    the file in the one-line errors."""
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{where}: not a loadable tokenizer file ({one_line(e)})") from e
    try:
        return Tokenizer.from_payload(payload)
    except UserError as e:
        raise UserError(f"{where}: {one_line(e)}") from e
    except Exception as e:  # a semid_dist file with missing or mismatched tensors
        raise UserError(f"{where}: damaged tokenizer file ({type(e).__name__}: {one_line(e)})") from e


def read_tokenizer(uri: str, store: Storage) -> tuple[Tokenizer, bytes]:
    """The tokenizer at uri (a local path or s3:// URI) and the file's bytes: the one loader
    behind load_tokenizer, ``semid encode`` and the nightly job."""
    raw = store.read_bytes(uri, "tokenizer file")
    return tokenizer_from_bytes(raw, uri), raw


def load_tokenizer(path: str, endpoint_url: str = "") -> Tokenizer:
    """Load ``final_model.pt`` (local path or s3:// URI) safely (weights_only=True).
    endpoint_url: an S3-compatible server (MinIO, SeaweedFS, ...), as --s3_endpoint_url; without
    it AWS_ENDPOINT_URL or AWS itself. Credentials come from the environment / AWS config."""
    return read_tokenizer(path, Storage.resolve(endpoint_url))[0]
