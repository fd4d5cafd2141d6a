"""The TIGER training step, epoch and evaluation, written once for 1 and N workers.

No Ray and no I/O here: the worker (worker.py) hands in this rank's rows and a Collectives
object; with one process every collective is the identity. Three rules keep N workers equal to
one worker over the same global batches:

1. Step j of an epoch runs on every rank, on that rank's rows of global batch j (batches.py),
   even when it has none (a zero row with weight 0 keeps the DDP all-reduce in step).
2. Each rank scales its mean loss by world * b_rank / b_global, so DDP's gradient average equals
   the gradient of the mean over the global batch.
3. The codebook statistics are summed over ranks before the EMA division (RQVAE.ema_update);
   dead-code restarts and the k-means init draw from data gathered from every rank and sorted
   by ItemID, so they pick the same vectors whatever the sharding, and rank 0 broadcasts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from semid_dist.config import Config
from semid_dist.math.kmeans import fit_kmeans
from semid_dist.math.metrics import collision_stats, level_stats
from semid_dist.math.rows import take_rows_in_place
from semid_dist.math.rqvae import RQVAE
from semid_dist.tiger import batches
from semid_dist.tiger.collectives import Collectives

# TIGER initialises the codebooks by k-means on the first batch; one batch has too few points
# per code for K=256 (512 rows), so we take the first global batches holding ~32 points per code.
INIT_POINTS_PER_CODE = 32
EVAL_CHUNK = 16384
HIDDEN_DIMS = (512, 256, 128)  # the original tool's encoder: input -> 512 -> 256 -> 128 -> latent


def model_args(cfg: Config, input_dim: int) -> dict:
    """RQVAE constructor arguments (plain types: they are saved in final_model.pt)."""
    return {
        "input_dim": int(input_dim),
        "latent_dim": cfg.latent_dim,
        "n_layers": cfg.n_layers,
        "n_embed": cfg.n_embed,
        "hidden_dims": list(HIDDEN_DIMS),
        "use_ema": cfg.use_ema,
        "decay": cfg.ema_decay,
        "beta": cfg.beta,
        "dead_code_threshold": cfg.dead_code_threshold,
        "gumbel": cfg.gumbel,
    }


def init_weights(model: RQVAE) -> None:
    """He-normal weights for the bias-free SiLU MLPs, so the latent starts at the scale training
    takes it to. torch's default Linear init shrinks activations at every layer: the original tool's
    4-layer encoder then emits latents far smaller than after a few hundred steps, the k-means
    codebooks fitted at init are left behind, and within a few epochs nearly every item lands
    on one code."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def temperature(cfg: Config, epoch: int) -> float:
    """Gumbel-softmax temperature: exponential decay from gumbel_temperature at the first epoch
    to gumbel_temperature_min at the last (Jang et al. 2017 anneal towards a hard sample)."""
    t0, t1 = cfg.gumbel_temperature, min(cfg.gumbel_temperature_min, cfg.gumbel_temperature)
    frac = epoch / max(cfg.epochs - 1, 1)
    return float(t0 * (t1 / t0) ** frac)


@dataclass
class RankData:
    """This rank's rows, sorted by ItemID, split into train and validation."""

    ids_train_T: np.ndarray
    x_train_TD: torch.Tensor
    ids_val_V: np.ndarray
    x_val_VD: torch.Tensor
    n_train: int  # over all ranks
    n_val: int  # over all ranks
    n_batches: int

    @classmethod
    def build(
        cls,
        ids_N: np.ndarray,
        x_ND: np.ndarray,
        cfg: Config,
        comm: Collectives,
        device: torch.device,
        consume: bool = False,
    ) -> "RankData":
        """ids_N and the rows as read, in any order (row i of x_ND is item ids_N[i]). The rows
        are rearranged (train rows sorted by ItemID, then validation rows sorted by ItemID) in
        x_ND itself when consume is True (the caller gives the array up), else in a copy."""
        rows_ND = x_ND if consume else x_ND.copy()
        assert rows_ND.shape[0] == len(ids_N), (rows_ND.shape, len(ids_N))
        order = np.argsort(ids_N, kind="stable")
        ids_sorted = ids_N[order]
        val_sorted = batches.validation_mask(ids_sorted, cfg.seed, cfg.val_fraction)
        n_train, n_val = (
            int(v) for v in comm.sum_numbers([float((~val_sorted).sum()), float(val_sorted.sum())])
        )
        if n_train < cfg.n_embed:
            raise ValueError(
                f"n_embed={cfg.n_embed} codes need at least as many training items, "
                f"got {n_train} (val_fraction={cfg.val_fraction})"
            )
        t_here = int((~val_sorted).sum())
        # Row p of the result is row src[p] of the input. In place: a second array as large as
        # the shard would double the peak and is slow to fault in (math/rows.py).
        take_rows_in_place(rows_ND, np.concatenate([order[~val_sorted], order[val_sorted]]))
        rows = torch.from_numpy(rows_ND)
        return cls(
            ids_train_T=ids_sorted[~val_sorted],
            x_train_TD=rows[:t_here].to(device),
            ids_val_V=ids_sorted[val_sorted],
            x_val_VD=rows[t_here:].to(device),
            n_train=n_train,
            n_val=n_val,
            n_batches=batches.num_batches(n_train, cfg.batch_size),
        )


def _global_rows_by_id(ids_B: np.ndarray, rows_BC: torch.Tensor, comm: Collectives) -> torch.Tensor:
    """Rows from every rank, ordered by ItemID: the same tensor for any number of workers."""
    ids = comm.gather_rows(torch.from_numpy(ids_B).to(rows_BC.device))
    rows = comm.gather_rows(rows_BC)
    return rows[torch.argsort(ids)]


def init_codebooks(model: RQVAE, data: RankData, cfg: Config, comm: Collectives) -> bool:
    """TIGER's k-means initialisation on the latents of epoch 0's first global batches.

    Computed once on rank 0 with the project's k-means and broadcast; a no-op when the model
    came from a checkpoint (model.is_initialized)."""
    if model.is_initialized:
        return False
    n_init = min(data.n_batches, math.ceil(INIT_POINTS_PER_CODE * cfg.n_embed / cfg.batch_size))
    take_T = batches.epoch_batch_index(data.ids_train_T, cfg.seed, 0, data.n_batches) < n_init
    with torch.no_grad():
        z_TH = model.encoder(data.x_train_TD[torch.from_numpy(take_T).to(data.x_train_TD.device)])
    z_NH = _global_rows_by_id(data.ids_train_T[take_T], z_TH.float(), comm).cpu()
    if z_NH.shape[0] < cfg.n_embed:  # tiny catalogs: fall back to every training row
        with torch.no_grad():
            z_TH = model.encoder(data.x_train_TD)
        z_NH = _global_rows_by_id(data.ids_train_T, z_TH.float(), comm).cpu()
    generator = torch.Generator().manual_seed(cfg.seed)

    def kmeans_fn(z: torch.Tensor, k: int) -> torch.Tensor:
        return fit_kmeans(z, k, cfg.max_iters, generator, progressive=cfg.kmeans_progressive)

    avg_batch = data.n_train / data.n_batches
    if comm.rank == 0:
        model.init_codebooks_kmeans(z_NH, kmeans_fn, broadcast=comm.broadcast0_, batch_size=avg_batch)
    else:
        model.init_codebooks_kmeans(None, kmeans_fn, broadcast=comm.broadcast0_)
    return True


class NoHooks:
    """Step hooks that do nothing: what users run (tests inject their own, tiger/worker.py)."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass


@dataclass
class Loop:
    """What every epoch of one rank's training loop works with."""

    net: torch.nn.Module  # the DDP wrapper (or the model itself at world 1)
    model: RQVAE  # DDP's .module: the EMA update, dead-code restart and temperature live here
    opt: torch.optim.Optimizer
    data: RankData
    cfg: Config
    comm: Collectives
    restart_every: int = 0  # steps between dead-code checks; 0: never
    hooks: Any = field(default_factory=NoHooks)  # before_step(step), after_step(step)


@dataclass
class _EpochBatches:
    counts_WB: torch.Tensor  # every rank's row count in every global batch (CPU)
    order_T: np.ndarray  # this rank's rows, grouped by batch
    offsets: np.ndarray  # batch j is order_T[offsets[j]:offsets[j + 1]]
    order_dev: torch.Tensor  # order_T on the rows' device


def _epoch_batches(loop: Loop, epoch: int) -> _EpochBatches:
    """This epoch's global batches (a hash of ItemID, seed and epoch), and every rank's share of
    each: all ranks know all sizes, so no step is a surprise."""
    data, comm, nb = loop.data, loop.comm, loop.data.n_batches
    device = data.x_train_TD.device
    batch_T = batches.epoch_batch_index(data.ids_train_T, loop.cfg.seed, epoch, nb)
    counts_WB = torch.zeros(comm.world, nb, dtype=torch.int64, device=device)
    counts_WB[comm.rank] = torch.from_numpy(np.bincount(batch_T, minlength=nb)).to(device)
    comm.sum_(counts_WB)
    order_T, offsets = batches.group_rows(batch_T, nb)
    return _EpochBatches(counts_WB.cpu(), order_T, offsets, torch.from_numpy(order_T).to(device))


def train_epoch(loop: Loop, epoch: int, step: int) -> tuple[dict, int]:
    """One pass over the training rows in global batches; returns (metrics, next global step)."""
    model, data, comm, cfg = loop.model, loop.data, loop.comm, loop.cfg
    eb = _epoch_batches(loop, epoch)
    restart_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
    # Gumbel noise differs per rank (different rows) but is reproducible per epoch, so a resumed
    # run draws what the uninterrupted run drew.
    torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + comm.rank)

    sums = torch.zeros(4, dtype=torch.float64, device=data.x_train_TD.device)  # loss, recon, commit, codebook
    restarted_L = [0] * model.n_layers
    zero_row = data.x_train_TD.new_zeros(1, model.input_dim)
    for j in range(data.n_batches):
        b_global = int(eb.counts_WB[:, j].sum())
        if b_global == 0:  # an empty hash bucket: empty on every rank alike
            continue
        loop.hooks.before_step(step)
        lo, hi = int(eb.offsets[j]), int(eb.offsets[j + 1])
        x_BD = data.x_train_TD[eb.order_dev[lo:hi]] if hi > lo else zero_row
        out = loop.net(x_BD)
        weight = comm.world * (hi - lo) / b_global
        loop.opt.zero_grad(set_to_none=True)
        (out.loss * weight).backward()
        loop.opt.step()
        stats_LKC = out.stats_LKC
        if hi == lo:
            stats_LKC.zero_()
        model.ema_update(stats_LKC, all_reduce=comm.sum_)
        n_dead = _restart_dead_codes(loop, out, step, eb.order_T[lo:hi], restart_gen)
        restarted_L = [a + b for a, b in zip(restarted_L, n_dead, strict=True)]
        with torch.no_grad():
            sums += torch.stack([out.loss, out.recon, out.commit, out.codebook]).double() * (hi - lo)
        loop.hooks.after_step(step)
        step += 1
    comm.sum_(sums)
    loss, recon, commit, codebook = (v / max(data.n_train, 1) for v in sums.tolist())
    return {
        "loss": loss,
        "recon": recon,
        "commit": commit,
        "codebook": codebook,
        "restarted": restarted_L,
    }, step


def _restart_dead_codes(loop: Loop, out, step: int, rows_B: np.ndarray, gen: torch.Generator) -> list[int]:
    """Every restart_every steps, codes whose EMA count fell below the threshold restart on this
    batch's residuals (gathered from every rank). The same decision on every rank: the EMA
    counts were all-reduced, so are identical. Returns the codes restarted per level."""
    model = loop.model
    if not (
        loop.restart_every
        and (step + 1) % loop.restart_every == 0
        and model.dead_code_threshold > 0
        and bool((model.ema_count_LK < model.dead_code_threshold).any())
    ):
        return [0] * model.n_layers
    n_real = len(rows_B)
    resid_BLH = (
        out.residuals_LBH[:, :n_real].transpose(0, 1).reshape(n_real, model.n_layers * model.latent_dim)
    )
    glob = _global_rows_by_id(loop.data.ids_train_T[rows_B], resid_BLH.contiguous(), loop.comm)
    resid_LBH = glob.reshape(glob.shape[0], model.n_layers, model.latent_dim).transpose(0, 1)
    return model.restart_dead_codes(resid_LBH, gen, broadcast=loop.comm.broadcast0_)


def _sum_of_squares(x_ND: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a chunk, in float64: each row's norm in float32 (one pass, no N x D
    temporary), squared and summed in float64. It agrees with squaring every element in float64
    to well within float32 precision, and avoids the float64 copy of the chunk and its square,
    which would take a large share of evaluate's time on CPU."""
    return torch.linalg.vector_norm(x_ND, dim=1).double().square().sum()


CATALOG_METRICS = ("rel_recon", "dup_rate", "codes_used", "perplexity")


def catalog_eval_due(epochs_done: int, cfg: Config) -> bool:
    """Whether the epoch that completes `epochs_done` evaluates every item (evaluate with
    catalog=True): every cfg.eval_every epochs and at the last one. An early stop at another
    epoch evaluates the catalog once more after the fact (tiger/worker.py)."""
    return epochs_done % cfg.eval_every == 0 or epochs_done >= cfg.epochs


@torch.no_grad()
def evaluate(
    model: RQVAE, data: RankData, comm: Collectives, catalog: bool = True
) -> tuple[dict, np.ndarray | None]:
    """Encode items as the exported tokenizer will (greedy nearest codes, no noise) and return
    the validation reconstruction (what early stopping watches) and, with catalog=True, the
    relative reconstruction error, collision rate and per-level usage over all items, plus the
    per-level code counts (L, K) for the usage plot (else None, and None for CATALOG_METRICS).
    Same on every rank; every rank must pass the same catalog (it decides a collective).

    Why catalog=False exists: encoding and decoding every item is a forward pass through the
    encoder and the decoder for each of them (the MLPs' GEMMs), a large fraction of an epoch's
    training time on CPU. The validation split alone is val_fraction of it."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=data.x_train_TD.device)  # val err, val norm, err, norm
    codes = []
    splits = ((data.x_train_TD, False), (data.x_val_VD, True)) if catalog else ((data.x_val_VD, True),)
    for x_ND, is_val in splits:
        for lo in range(0, x_ND.shape[0], EVAL_CHUNK):
            x = x_ND[lo : lo + EVAL_CHUNK]
            c_NL = model.encode(x, chunk=EVAL_CHUNK)
            err = _sum_of_squares(model.decode_codes(c_NL).sub_(x))
            norm = _sum_of_squares(x)
            sums[2] += err
            sums[3] += norm
            if is_val:
                sums[0] += err
                sums[1] += norm
            codes.append(c_NL.to(torch.int32))
    model.train(was_training)
    comm.sum_(sums)
    val_err, val_norm, err, norm = sums.tolist()
    metrics = {
        "val_recon": val_err / data.n_val if data.n_val else None,
        "val_rel_recon": val_err / val_norm if val_norm > 0 else None,
    }
    if not catalog:
        return {**metrics, **dict.fromkeys(CATALOG_METRICS)}, None
    local = (
        torch.cat(codes) if codes else torch.zeros(0, model.n_layers, dtype=torch.int32, device=sums.device)
    )
    codes_NL = comm.gather_rows(local).cpu().numpy().astype(np.int64)
    levels = level_stats(codes_NL, model.n_embed)
    usage_LK = np.stack(
        [np.bincount(codes_NL[:, lvl], minlength=model.n_embed) for lvl in range(model.n_layers)]
    )
    metrics.update(
        {
            "rel_recon": err / norm if norm > 0 else 0.0,
            "dup_rate": collision_stats(codes_NL)["collision_rate"],
            "codes_used": [lv["codes_used"] for lv in levels],
            "perplexity": [round(lv["perplexity"], 2) for lv in levels],
        }
    )
    return metrics, usage_LK


ADAMW_LR_WARN = 0.05  # learning rates above this are Adagrad-style, far above what AdamW tolerates


def divergence(record: dict) -> str | None:
    """Why an epoch's record shows a diverged model, or None. The figures were all-reduced, so
    every rank reaches the same verdict after the same epoch. A validation error above 1 is
    worse than reconstructing every item as zeros."""
    loss, val = record["loss"], record.get("val_rel_recon")
    if math.isfinite(loss) and (val is None or (math.isfinite(val) and val <= 1.0)):
        return None
    what = f"loss {loss:.3g}" + (
        "" if val is None else f", validation relative reconstruction error {val:.3g}"
    )
    return (
        f"tiger diverged at epoch {record['epoch']} ({what}); nothing was published: "
        f"--learning_rate {record['lr']:g} is too high for AdamW, try about 1e-3 (TIGER's 0.4 is an "
        "Adagrad-style rate)"
    )


def model_score(record: dict) -> tuple[float, float] | None:
    """--keep_model best's key for an epoch: (the validation relative reconstruction error, or
    the catalog's without a validation split; the collision rate), lower is better; None for an
    epoch without the catalog-wide evaluation. All-reduced figures: every rank agrees."""
    if record.get("rel_recon") is None:
        return None
    val = record.get("val_rel_recon")
    return (float(val if val is not None else record["rel_recon"]), float(record["dup_rate"]))
