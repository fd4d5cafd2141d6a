"""The Python API: load a trained tokenizer and turn embeddings into codes.

    >>> from semid_dist import load_tokenizer
    >>> tok = load_tokenizer("output/films/final_model.pt")
    >>> codes_NL = tok.encode(embeddings_ND)      # (N, n_layers) int64, before dedup

``final_model.pt`` holds only tensors, numbers and strings, so it loads with
``torch.load(weights_only=True)``: opening a file someone hands you runs no code.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from semid_dist.errors import UserError, one_line
from semid_dist.math.nearest import beam_encode, residual_decode, residual_encode
from semid_dist.math.nearest_faiss import FaissRQ, gpu_count
from semid_dist.storage import Storage

FORMAT = "semid_dist/v1"


class Tokenizer:
    """Residual-quantization tokenizer: kmeans codebooks, or a tiger RQ-VAE."""

    def __init__(
        self,
        mode: str,
        config: dict[str, Any],
        codebooks_LKD: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
        model_args: dict | None = None,
    ):
        self.mode = mode
        self.config = config
        self.codebooks_LKD = codebooks_LKD
        self.model = model
        self.model_args = model_args or {}
        self._faiss_rq = None  # faiss-gpu indexes over the codebooks, built on first use
        if mode == "kmeans":
            assert codebooks_LKD is not None and codebooks_LKD.ndim == 3
        else:
            assert model is not None
            self.model.eval()

    @property
    def n_layers(self) -> int:
        return int(self.codebooks_LKD.shape[0]) if self.mode == "kmeans" else self.model.n_layers

    @property
    def n_codes(self) -> int:
        return int(self.codebooks_LKD.shape[1]) if self.mode == "kmeans" else self.model.n_embed

    @property
    def input_dim(self) -> int:
        return int(self.codebooks_LKD.shape[2]) if self.mode == "kmeans" else self.model.input_dim

    @property
    def beam_size(self) -> int:
        """Code paths kept per level when encoding (kmeans; 1: greedy), as trained."""
        return int(self.config.get("beam_size", 1)) if isinstance(self.config, dict) else 1

    @property
    def device(self) -> torch.device:
        return self.codebooks_LKD.device if self.mode == "kmeans" else next(self.model.buffers()).device

    def to(self, device: str | torch.device) -> "Tokenizer":
        """Move the codebooks/model to a device (encode then runs there)."""
        self._faiss_rq = None
        if self.mode == "kmeans":
            self.codebooks_LKD = self.codebooks_LKD.to(device)
        else:
            self.model.to(device)
        return self

    def _as_tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
            if not x.flags.writeable:  # e.g. a zero-copy view of an Arrow block: torch wants to own it
                x = x.copy()
        x_ND = torch.as_tensor(x)
        if x_ND.ndim != 2 or x_ND.shape[1] != self.input_dim:
            raise UserError(f"expected embeddings of shape (N, {self.input_dim}), got {tuple(x_ND.shape)}")
        return x_ND.to(self.device, torch.float32)

    @torch.no_grad()
    def encode_with_error(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Codes (N, L) and the squared reconstruction error of every row."""
        x_ND = self._as_tensor(x)
        if self.mode == "kmeans":
            books = list(self.codebooks_LKD)
            if self.beam_size > 1:
                codes_NL, sq_err_N = beam_encode(x_ND, books, self.beam_size)
            elif x_ND.device.type == "cuda" and gpu_count() > 0:  # faiss-gpu's flat indexes
                if self._faiss_rq is None:
                    self._faiss_rq = FaissRQ(self.codebooks_LKD.cpu().numpy(), gpu=True)
                codes, sq = self._faiss_rq.encode(x_ND.cpu().numpy())
                return codes, sq.astype(np.float64)
            else:
                codes_NL, resid_ND = residual_encode(x_ND, books)
                sq_err_N = (resid_ND.double() ** 2).sum(1)
        else:
            codes_NL = self.model.encode(x_ND)
            x_hat_ND = self.model.decode_codes(codes_NL)
            sq_err_N = ((x_ND - x_hat_ND).double() ** 2).sum(1)
        return codes_NL.cpu().numpy(), sq_err_N.cpu().numpy()

    def encode(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.encode_with_error(x)[0]

    @torch.no_grad()
    def last_level_candidates(
        self, x: np.ndarray | torch.Tensor, codes_NL: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's own last code and its k-1 nearest other last-level codes under the same
        first L-1 codes ((N, k) int32, own code first), with the squared reconstruction error
        each would give (float32): math/relocate.py. kmeans: the exact error, ranked by it.
        tiger: the k codes nearest in the latent space, each scored by the decoder's error."""
        from semid_dist.math.relocate import _top_candidates, last_level_candidates_np

        x_ND = self._as_tensor(x)
        if self.mode == "kmeans":
            books = self.codebooks_LKD.detach().cpu().float().numpy()
            return last_level_candidates_np(x_ND.cpu().numpy(), books, np.asarray(codes_NL), k)
        model, n = self.model, x_ND.shape[0]
        books = model.codebooks_LKH.detach()
        c = torch.as_tensor(np.asarray(codes_NL), dtype=torch.long, device=x_ND.device)
        z_NH = model.encoder(x_ND)
        prefix_NH = torch.zeros_like(z_NH)
        for level in range(model.n_layers - 1):
            prefix_NH += books[level][c[:, level]]
        d_NK = torch.cdist(z_NH - prefix_NH, books[-1]).square().cpu().numpy()
        k = min(k, books.shape[1])
        cand, _ = _top_candidates(d_NK, c[:, -1].cpu().numpy(), k)  # nearest in the latent space
        q = prefix_NH[:, None, :] + books[-1][torch.as_tensor(cand, dtype=torch.long, device=x_ND.device)]
        x_hat = model.decoder(q.reshape(n * k, -1)).reshape(n, k, -1)
        err = ((x_ND[:, None, :] - x_hat).double() ** 2).sum(-1).float().cpu().numpy()
        return cand, err

    @torch.no_grad()
    def decode(self, codes_NL: np.ndarray | torch.Tensor) -> np.ndarray:
        """The reconstruction of the given codes (sum of centroids, or the decoder output)."""
        c = torch.as_tensor(np.asarray(codes_NL), dtype=torch.long)
        if self.mode == "kmeans":
            return residual_decode(c.to(self.device), list(self.codebooks_LKD)).cpu().numpy()
        return self.model.decode_codes(c.to(self.device)).cpu().numpy()

    # --- serialisation ----------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "mode": self.mode, "config": self.config}
        if self.mode == "kmeans":
            out["codebooks"] = self.codebooks_LKD.detach().cpu().contiguous()
        else:
            out["model_args"] = self.model_args
            out["state_dict"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return out

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> "Tokenizer":
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise UserError("not a semid_dist tokenizer file (missing format marker)")
        mode = payload["mode"]
        if mode == "kmeans":
            return cls("kmeans", payload["config"], codebooks_LKD=payload["codebooks"].float())
        if mode == "tiger":
            from semid_dist.math.rqvae import RQVAE

            model = RQVAE(**payload["model_args"])
            model.load_state_dict(payload["state_dict"])
            return cls("tiger", payload["config"], model=model, model_args=payload["model_args"])
        raise UserError(f"unknown tokenizer mode {mode!r}")


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
