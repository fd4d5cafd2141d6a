"""RQ-VAE for TIGER mode (Rajput et al. 2023, arXiv 2305.05065): the pure-math part.

MLP encoder -> L levels of residual vector quantization -> MLP decoder. No Ray, no I/O, no
process groups: every collective is a function passed in (``all_reduce`` / ``broadcast``,
defaulting to a no-op), so the same module runs in a unit test and under DDP.

The training step a worker runs::

    out = model(x_BD)                                  # stats collected, nothing mutated
    out.loss.backward(); opt.step()
    model.ema_update(out.stats_LKC, all_reduce=sum_fn)  # ONE collective per step
    model.restart_dead_codes(out.residuals_LBH, gen, broadcast=bcast_fn)  # when the caller wants

Why the EMA update lives outside ``forward``: under DDP the per-code counts and sums must be
summed across ranks *before* the EMA division, so that every replica computes the identical
codebook by construction; hiding the update in forward would make each rank drift on its own
shard, and DDP's buffer broadcast would only mask that.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semid_dist.math.nearest import backend_for
from semid_dist.math.nearest_torch import DEFAULT_CHUNK, nearest_code, residual_decode

Collective = Callable[[torch.Tensor], object]


def _noop(t: torch.Tensor) -> torch.Tensor:
    """Single-process stand-in for all_reduce(SUM) / broadcast(src=0): nothing to combine."""
    return t


class EMAStep(NamedTuple):
    count_K: torch.Tensor
    sum_KD: torch.Tensor
    codebook_KD: torch.Tensor


def ema_step(
    ema_count_K: torch.Tensor,
    ema_sum_KD: torch.Tensor,
    batch_count_K: torch.Tensor,
    batch_sum_KD: torch.Tensor,
    decay: float,
    eps: float,
) -> EMAStep:
    """One EMA codebook update (van den Oord et al. 2017, appendix; Sonnet's VQ-VAE-EMA).

    Pure: returns the new count, sum and codebook without touching its inputs. The batch
    statistics must already be summed over workers. Laplace smoothing keeps a code with a
    (near-)zero count from dividing by zero while preserving the total count:
    n_i = (count_i + eps) / (total + K * eps) * total.
    """
    count_K = ema_count_K * decay + batch_count_K * (1.0 - decay)
    sum_KD = ema_sum_KD * decay + batch_sum_KD * (1.0 - decay)
    total = count_K.sum()
    smoothed_K = (count_K + eps) / (total + count_K.shape[0] * eps) * total
    return EMAStep(count_K, sum_KD, sum_KD / smoothed_K.unsqueeze(1))


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Bias-free linear layers, SiLU between them, none after the last (the original tool's architecture)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAEOutput(NamedTuple):
    x_hat_BD: torch.Tensor
    codes_BL: torch.Tensor
    z_BH: torch.Tensor
    zq_BH: torch.Tensor  # decoder input: value = sum of chosen codewords, d(zq)/d(z) = identity
    loss: torch.Tensor  # recon + commit + codebook
    recon: torch.Tensor
    commit: torch.Tensor
    codebook: torch.Tensor
    # Training mode only (None in eval): per level and code, [count, sum of residuals (H)].
    # One flat tensor so a single all_reduce covers every level (one collective per step).
    stats_LKC: Optional[torch.Tensor]
    residuals_LBH: Optional[torch.Tensor]  # detached residual entering each level: restart source


class RQVAE(nn.Module):
    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        n_layers: int,
        n_embed: int,
        hidden_dims: Sequence[int] = (512, 256, 128),
        use_ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        beta: float = 0.25,
        dead_code_threshold: float = 1.0,
        gumbel: bool = False,
    ) -> None:
        super().__init__()
        if gumbel and use_ema:
            raise ValueError("gumbel=True needs use_ema=False: Gumbel-softmax learns codebooks by gradient")
        for name, value in (
            ("input_dim", input_dim),
            ("latent_dim", latent_dim),
            ("n_layers", n_layers),
            ("n_embed", n_embed),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.input_dim, self.latent_dim = input_dim, latent_dim
        self.n_layers, self.n_embed = n_layers, n_embed
        self.hidden_dims = tuple(hidden_dims)
        self.use_ema, self.gumbel = use_ema, gumbel
        self.decay, self.eps, self.beta = decay, eps, beta
        self.dead_code_threshold = dead_code_threshold
        self.temperature = 1.0  # Gumbel-softmax temperature; the caller owns the schedule

        self.encoder = _mlp([input_dim, *self.hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(self.hidden_dims), input_dim])

        # Placeholder codebooks until init_codebooks_kmeans; all levels stacked in one tensor.
        codebooks_LKH = torch.randn(n_layers, n_embed, latent_dim) / latent_dim**0.5
        if use_ema:
            # A buffer, not a parameter: updated outside autograd, and never touched by the
            # optimizer.
            self.register_buffer("codebooks_LKH", codebooks_LKH)
        else:
            self.codebooks_LKH = nn.Parameter(codebooks_LKH)
        # EMA of per-code usage (both modes: drives dead-code restart) and, under EMA, of
        # per-code residual sums. ema_sum = codebook * count makes the first step a no-op
        # reweighting rather than a jump.
        self.register_buffer("ema_count_LK", torch.ones(n_layers, n_embed))
        self.register_buffer("ema_sum_LKH", codebooks_LKH.clone())
        # Saved with the state dict so a resumed run skips k-means init. uint8, not bool:
        # some collective backends (gloo) have no bool type.
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized.item())

    def forward(self, x_BD: torch.Tensor) -> RQVAEOutput:
        z_BH = self.encoder(x_BD)
        codebooks_LKH = self.codebooks_LKH
        b, n_lvl, k = z_BH.shape[0], self.n_layers, self.n_embed
        use_gumbel = self.gumbel and self.training

        residual_BH = z_BH
        q_sum_BH = torch.zeros_like(z_BH)
        codes_BL = torch.empty(b, n_lvl, dtype=torch.long, device=z_BH.device)
        residuals_LBH = torch.empty(n_lvl, b, self.latent_dim, dtype=z_BH.dtype, device=z_BH.device)
        commit = z_BH.new_zeros(())
        codebook_loss = z_BH.new_zeros(())
        for lvl in range(n_lvl):
            cb_KH = codebooks_LKH[lvl]
            r_BH = residual_BH.detach()
            residuals_LBH[lvl] = r_BH
            if use_gumbel:
                # Logits from distances to a detached residual: the encoder is trained by the
                # straight-through path below, the codebook by the soft (hard-forward) sample.
                d_BK = (r_BH * r_BH).sum(1, keepdim=True) - 2 * r_BH @ cb_KH.T + (cb_KH * cb_KH).sum(1)
                w_BK = F.gumbel_softmax(-d_BK, tau=self.temperature, hard=True)
                idx_B = w_BK.argmax(1)
                q_BH = w_BK @ cb_KH
            else:
                idx_B, _ = nearest_code(r_BH, cb_KH.detach())
                q_BH = cb_KH[idx_B]  # carries codebook grad under no_ema (codebook loss only)
            codes_BL[:, lvl] = idx_B
            # Commitment: beta * ||r_i - sg[e_i]||^2, summed over dims, mean over batch.
            commit = commit + self.beta * (residual_BH - q_BH.detach()).pow(2).sum(1).mean()
            if not self.use_ema:
                codebook_loss = codebook_loss + (r_BH - q_BH).pow(2).sum(1).mean()
            # Next residual keeps its gradient path to z, so every level's commitment term
            # reaches the encoder (as in Lee et al. 2022: ||z - sg[sum_{j<=i} e_j]||^2).
            residual_BH = residual_BH - q_BH.detach()
            q_sum_BH = q_sum_BH + (q_BH if use_gumbel else q_BH.detach())

        # Straight-through estimator: forward value is the sum of chosen codewords, backward is
        # the identity to z. Equivalent to chaining r_i + sg[q_i - r_i] level by level with
        # r_{i+1} = r_i - that; summing per-level STE outputs of a grad-carrying residual chain
        # would instead scale the encoder's reconstruction gradient by L.
        zq_BH = z_BH - z_BH.detach() + q_sum_BH
        x_hat_BD = self.decoder(zq_BH)
        # Summed over dims, mean over batch: averaging over the D input dims would make
        # reconstruction D times weaker than the VQ terms; public reimplementations that
        # average collapse for that reason.
        recon = (x_hat_BD - x_BD).pow(2).sum(1).mean()

        stats_LKC = None
        if self.training:
            with torch.no_grad():
                stats_LKC = torch.zeros(
                    n_lvl, k, 1 + self.latent_dim, dtype=torch.float32, device=z_BH.device
                )
                r32_LBH = residuals_LBH.float()
                ones_B = torch.ones(b, dtype=torch.float32, device=z_BH.device)
                for lvl in range(n_lvl):
                    stats_LKC[lvl, :, 0].index_add_(0, codes_BL[:, lvl], ones_B)
                    stats_LKC[lvl, :, 1:].index_add_(0, codes_BL[:, lvl], r32_LBH[lvl])
        return RQVAEOutput(
            x_hat_BD=x_hat_BD,
            codes_BL=codes_BL,
            z_BH=z_BH,
            zq_BH=zq_BH,
            loss=recon + commit + codebook_loss,
            recon=recon,
            commit=commit,
            codebook=codebook_loss,
            stats_LKC=stats_LKC,
            residuals_LBH=residuals_LBH if self.training else None,
        )

    @torch.no_grad()
    def ema_update(self, stats_LKC: torch.Tensor, all_reduce: Collective = _noop) -> None:
        """Fold one step's statistics into the EMA state (and, under EMA, the codebooks).

        ``all_reduce`` sums ``stats_LKC`` in place across workers and is called exactly once,
        before any division, so every replica ends with bit-identical state. Under no_ema only
        the usage counts are tracked (they drive dead-code restart); call it in both modes.
        ``stats_LKC`` is modified in place.
        """
        assert stats_LKC.shape == (self.n_layers, self.n_embed, 1 + self.latent_dim)
        all_reduce(stats_LKC)
        stats_LKC = stats_LKC.to(self.ema_count_LK.dtype)
        if not self.use_ema:
            self.ema_count_LK.mul_(self.decay).add_(stats_LKC[..., 0], alpha=1.0 - self.decay)
            return
        for lvl in range(self.n_layers):
            step = ema_step(
                self.ema_count_LK[lvl],
                self.ema_sum_LKH[lvl],
                stats_LKC[lvl, :, 0],
                stats_LKC[lvl, :, 1:],
                self.decay,
                self.eps,
            )
            self.ema_count_LK[lvl] = step.count_K
            self.ema_sum_LKH[lvl] = step.sum_KD
            self.codebooks_LKH[lvl] = step.codebook_KD.to(self.codebooks_LKH.dtype)

    @torch.no_grad()
    def restart_dead_codes(
        self,
        residuals_LBH: torch.Tensor,
        generator: torch.Generator,
        broadcast: Collective = _noop,
    ) -> list[int]:
        """Re-seed codes whose EMA count is below ``dead_code_threshold`` from batch residuals.

        ``residuals_LBH`` is ``RQVAEOutput.residuals_LBH`` (level l draws from the residuals that
        entered level l). The dead set is identical on every rank (the EMA counts were
        all-reduced), so each rank draws the same number of vectors and one ``broadcast``
        (rank 0's values overwrite the rest, in place) makes them identical; it is skipped on
        every rank alike when nothing is dead. Returns the number restarted per level.
        """
        dead_LK = self.ema_count_LK < self.dead_code_threshold
        n_dead = [int(n) for n in dead_LK.sum(1).tolist()]
        if sum(n_dead) == 0:
            return n_dead
        picks = []
        n_rows = residuals_LBH.shape[1]
        for lvl, n in enumerate(n_dead):
            if n == 0:
                continue
            # Distinct rows when the batch allows it, so restarted codes do not start as twins.
            if n <= n_rows:
                rows = torch.randperm(n_rows, generator=generator)[:n]
            else:
                rows = torch.randint(n_rows, (n,), generator=generator)
            picks.append(residuals_LBH[lvl, rows.to(residuals_LBH.device)])
        new_MH = torch.cat(picks).to(self.codebooks_LKH.dtype).contiguous()
        broadcast(new_MH)
        # Reset count to at least the threshold: a restarted code must get a fair chance to
        # win assignments before it is judged dead again.
        reset_count = max(float(self.dead_code_threshold), 1.0)
        codebooks = self.codebooks_LKH.data
        codebooks[dead_LK] = new_MH
        self.ema_count_LK[dead_LK] = reset_count
        self.ema_sum_LKH[dead_LK] = new_MH.to(self.ema_sum_LKH.dtype) * reset_count
        return n_dead

    @torch.no_grad()
    def init_codebooks_kmeans(
        self,
        z_NH: Optional[torch.Tensor],
        kmeans_fn: Callable[[torch.Tensor, int], torch.Tensor],
        broadcast: Collective = _noop,
        batch_size: Optional[int] = None,
    ) -> bool:
        """TIGER's initialisation: k-means level by level on the residuals of the first latents.

        Returns False (and does nothing) when already initialized, e.g. after loading a
        checkpoint. Under DDP, rank 0 passes its latents and the other ranks pass ``z_NH=None``
        with a real ``broadcast``: the fit runs once and its result overwrites every rank.
        EMA state is set consistently with the assignment: count = points per centroid (scaled
        to a per-batch count when ``batch_size`` is given, so it matches what ema_update adds
        each step), sum = centroid * count. A centroid with no points starts dead.
        """
        if self.is_initialized:
            return False
        if z_NH is None:
            assert broadcast is not _noop, "z_NH=None only makes sense when receiving via broadcast"
        else:
            resid_NH = z_NH.detach().to(self.codebooks_LKH.dtype).clone()
            scale = 1.0 if batch_size is None else batch_size / resid_NH.shape[0]
            for lvl in range(self.n_layers):
                cent_KH = kmeans_fn(resid_NH, self.n_embed).to(resid_NH)
                assert cent_KH.shape == (self.n_embed, self.latent_dim), cent_KH.shape
                idx_N, _ = nearest_code(resid_NH, cent_KH)
                count_K = torch.bincount(idx_N, minlength=self.n_embed).to(self.ema_count_LK)
                count_K *= scale
                self.codebooks_LKH.data[lvl] = cent_KH
                self.ema_count_LK[lvl] = count_K
                self.ema_sum_LKH[lvl] = cent_KH.to(self.ema_sum_LKH) * count_K.unsqueeze(1)
                resid_NH -= cent_KH[idx_N]
        for t in (self.codebooks_LKH.data, self.ema_count_LK, self.ema_sum_LKH):
            broadcast(t)
        self.initialized.fill_(1)
        return True

    @torch.no_grad()
    def encode(self, x_ND: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Codes (N, L) by greedy residual nearest-code search (always argmin, no Gumbel noise),
        with the backend of x's device (math/nearest.py: numpy on the CPU, torch on the device
        otherwise)."""
        was_training = self.training
        self.eval()
        try:
            quantizer = backend_for(x_ND.device, faiss=False).quantizer(self.codebooks_LKH.detach())
            codes_NL = torch.empty(x_ND.shape[0], self.n_layers, dtype=torch.long, device=x_ND.device)
            for start in range(0, x_ND.shape[0], chunk):
                z_BH = self.encoder(x_ND[start : start + chunk])
                codes_NL[start : start + chunk] = torch.from_numpy(quantizer.encode(z_BH)[0])
            return codes_NL
        finally:
            self.train(was_training)

    @torch.no_grad()
    def decode_codes(self, codes_NL: torch.Tensor) -> torch.Tensor:
        """Decoder output for given codes: decoder(sum of the selected codewords)."""
        return self.decoder(residual_decode(codes_NL, list(self.codebooks_LKH.detach())))
