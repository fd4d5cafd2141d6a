"""tiger mode: an RQ-VAE trained with DDP under Ray Train on the catalog or a hash sample of it
(docs/tiger.md); and its tokenizer, TigerTokenizer: the trained model, encoding with its encoder
and codebooks.

fit() is the mode's entry; the Ray Train driver (tiger/trainer.py), the loop every worker runs
(tiger/worker.py) and the steps (tiger/steps.py) are the tiger package's. Its imports wait for
fit(), so that loading a tiger tokenizer (the Python API, an encode task) does not import Ray
Train.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from semid_dist.errors import UserError
from semid_dist.math.rqvae import RQVAE
from semid_dist.tokenizer import Tokenizer

log = logging.getLogger("semid_dist")

KEEP_RULE = (
    "the lowest validation relative reconstruction error among the evaluation epochs "
    "(--eval_every and the last), then the lower collision rate"
)


def fit(job) -> tuple[TigerTokenizer, dict]:
    """The tiger mode's fit (job: modes.FitJob): train under Ray Train (tiger/trainer.py) on every
    item of the catalog, or on the hash sample --train_sample_gb allows (tiger/sample.py); write
    checkpoint_epoch_*.pt and the plots next to the outputs."""
    from semid_dist import export, testhooks
    from semid_dist.catalog import plumbing
    from semid_dist.catalog.source import training_dataset
    from semid_dist.tiger import batches, checkpoint, plots, steps
    from semid_dist.tiger import sample as train_sample
    from semid_dist.tiger.trainer import train

    cfg, scan, pub = job.cfg, job.scan, job.pub
    sample = train_sample.resolve(cfg, job.n_items, job.catalog.dim)
    in_sample = train_sample.keep(scan.ids_N, cfg.seed, sample.fraction)
    n_train = int((in_sample & ~batches.validation_mask(scan.ids_N, cfg.seed, cfg.val_fraction)).sum())
    if n_train < cfg.n_embed:
        where = "" if sample.whole else f" of the {int(in_sample.sum())}-item training sample"
        raise UserError(
            f"--n_embed {cfg.n_embed} is larger than the number of training items "
            f"({n_train}{where} after holding out --val_fraction {cfg.val_fraction})"
        )
    if cfg.learning_rate > steps.ADAMW_LR_WARN:
        log.warning(
            "tiger: --learning_rate %g is far above what AdamW tolerates (about 1e-3); 0.4, TIGER's "
            "rate, is meant for Adagrad: expect the loss to diverge",
            cfg.learning_rate,
        )
    ds = training_dataset(job.catalog, job.n_items, plumbing.read_tasks())
    if not sample.whole:  # the read tasks drop what is not in the sample
        args = (sample.fraction, cfg.seed)
        ds = ds.map_batches(train_sample.sample_rows, batch_format="pyarrow", batch_size=None, fn_args=args)
    fail_at = testhooks.fail_at_step()
    run = train(cfg, ds, job.catalog.dim, job.n_items, job.catalog.store, fail_at_step=fail_at, sample=sample)
    for epoch, ckpt in run.checkpoints:
        with ckpt.as_directory() as d:
            export.write_torch(
                pub, f"checkpoint_epoch_{epoch}.pt", checkpoint.original_tool_payload(checkpoint.load(d))
            )
    if run.loop.history:
        with pub.open(plots.CURVES, "wb") as f:
            f.write(plots.training_curves(run.loop.history))
        with pub.open(plots.USAGE, "wb") as f:
            f.write(plots.code_usage(np.asarray(run.loop.usage_LK)))
        run.fit_info["plots"] = [plots.CURVES, plots.USAGE]
    run.fit_info["checkpoint_files"] = [f"checkpoint_epoch_{e}.pt" for e, _ in run.checkpoints]
    model = run.kept_model() if cfg.keep_model == "best" else run.model
    history = {r["epoch"]: r for r in run.loop.history}
    epoch = run.loop.kept_epoch if cfg.keep_model == "best" and run.kept else run.loop.epoch
    run.fit_info["kept_model"] = {
        "keep_model": cfg.keep_model,
        "epoch": epoch,
        "why": KEEP_RULE if cfg.keep_model == "best" and run.kept else "the last epoch (--keep_model last)",
        "val_rel_recon": history.get(epoch, {}).get("val_rel_recon"),
        "rel_recon": history.get(epoch, {}).get("rel_recon"),
        "collision_rate": history.get(epoch, {}).get("dup_rate"),
    }
    log.info("tiger: keeping the model of epoch %d (%s)", epoch, run.fit_info["kept_model"]["why"])
    return TigerTokenizer(cfg.to_dict(), model.cpu(), run.model_args), run.fit_info


class TigerTokenizer(Tokenizer):
    """A trained RQ-VAE: the encoder maps an embedding to a latent, residual quantization of the
    latent gives the codes, the decoder reconstructs the embedding from their codewords."""

    mode = "tiger"

    def __init__(self, config: dict, model: torch.nn.Module, model_args: dict | None = None):
        super().__init__(config)
        assert model is not None
        self.model = model
        self.model_args = model_args or {}
        self.model.eval()

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @property
    def n_codes(self) -> int:
        return self.model.n_embed

    @property
    def input_dim(self) -> int:
        return self.model.input_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.buffers()).device

    def to(self, device: str | torch.device) -> TigerTokenizer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_with_error(self, x) -> tuple[np.ndarray, np.ndarray]:
        x_ND = self._as_tensor(x)
        codes_NL = self.model.encode(x_ND)
        x_hat_ND = self.model.decode_codes(codes_NL)
        sq_err_N = ((x_ND - x_hat_ND).double() ** 2).sum(1)
        return codes_NL.cpu().numpy(), sq_err_N.cpu().numpy()

    @torch.no_grad()
    def last_level_candidates(self, x, codes_NL: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k codes nearest in the latent space, each scored by the decoder's error."""
        from semid_dist.math.relocate import _top_candidates

        x_ND = self._as_tensor(x)
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
    def decode(self, codes_NL) -> np.ndarray:
        """The decoder's output for the codes."""
        c = torch.as_tensor(np.asarray(codes_NL), dtype=torch.long)
        return self.model.decode_codes(c.to(self.device)).cpu().numpy()

    def tensors(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"model_args": self.model_args, "state_dict": state}

    @classmethod
    def from_tensors(cls, config: dict, payload: dict) -> TigerTokenizer:
        model = RQVAE(**payload["model_args"])
        model.load_state_dict(payload["state_dict"])
        return cls(config, model, payload["model_args"])

    def config_sizes(self) -> dict[str, int]:
        sizes = {"n_embed": self.n_codes}
        if "latent_dim" in self.model_args:
            sizes["latent_dim"] = int(self.model_args["latent_dim"])
        return sizes

    def fingerprint_parts(self) -> tuple[bytes, dict[str, torch.Tensor]]:
        tensors = self.tensors()
        return json.dumps(tensors["model_args"], sort_keys=True, default=str).encode(), tensors["state_dict"]


TOKENIZER = TigerTokenizer
