"""Unit tests for the pure-math RQ-VAE (semid_dist/math/rqvae.py): tiny dims, CPU, seconds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from semid_dist.math.rqvae import RQVAE, ema_step


def lloyd_kmeans(x_ND: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd's k-means with random-point init: the stand-in for the project's k-means."""
    g = torch.Generator().manual_seed(seed)
    cent_KD = x_ND[torch.randperm(x_ND.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        idx = torch.cdist(x_ND, cent_KD).argmin(1)
        for j in range(k):
            members = x_ND[idx == j]
            if len(members):
                cent_KD[j] = members.mean(0)
    return cent_KD


def tiny_model(**kw) -> RQVAE:
    args = dict(input_dim=12, latent_dim=4, n_layers=3, n_embed=8, hidden_dims=(16, 8))
    args.update(kw)
    return RQVAE(**args)


def clusters(n=2000, d=16, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    labels = torch.randint(k, (n,), generator=g)
    return centers[labels] + 0.3 * torch.randn(n, d, generator=g)


def test_ema_step_matches_numpy_reference():
    rng = np.random.default_rng(0)
    k, d, decay, eps = 7, 5, 0.9, 1e-5
    count = rng.uniform(0, 3, k)
    count[2] = 0.0  # a dead code: Laplace smoothing must keep the division finite
    s = rng.normal(size=(k, d))
    bcount = rng.integers(0, 4, k).astype(np.float64)
    bsum = rng.normal(size=(k, d))

    new_count = decay * count + (1 - decay) * bcount
    new_sum = decay * s + (1 - decay) * bsum
    n = new_count.sum()
    smoothed = (new_count + eps) / (n + k * eps) * n
    ref = new_sum / smoothed[:, None]

    def t(a):
        return torch.tensor(a, dtype=torch.float32)

    before = t(count).clone()
    out = ema_step(t(count), t(s), t(bcount), t(bsum), decay, eps)
    np.testing.assert_allclose(out.count_K.numpy(), new_count, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum_KD.numpy(), new_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.codebook_KD.numpy(), ref, rtol=1e-4, atol=1e-5)
    # float64 in, float64 out, tight tolerance.
    out64 = ema_step(*(torch.from_numpy(a) for a in (count, s, bcount, bsum)), decay, eps)
    np.testing.assert_allclose(out64.codebook_KD.numpy(), ref, rtol=1e-12)
    assert torch.equal(t(count), before)  # pure: inputs untouched


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randn(32, 12)
    out = model(x)
    # d(zq)/d(z) is the identity: a vector-Jacobian product returns the vector itself.
    v = torch.randn_like(out.zq_BH)
    (g,) = torch.autograd.grad(out.zq_BH, out.z_BH, v, retain_graph=True)
    torch.testing.assert_close(g, v)

    w = model.encoder[0].weight
    (g_model,) = torch.autograd.grad(out.recon, w)
    assert g_model.abs().sum() > 0
    # Reference: identity with the same forward value, built by hand.
    z = model.encoder(x)
    zq_ref = z + (out.zq_BH.detach() - z).detach()
    recon_ref = (model.decoder(zq_ref) - x).pow(2).sum(1).mean()
    (g_ref,) = torch.autograd.grad(recon_ref, w)
    torch.testing.assert_close(g_model, g_ref)


def test_forward_value_is_sum_of_selected_codes_and_losses_summed_over_dims():
    torch.manual_seed(1)
    model = tiny_model(beta=0.25)
    x = torch.randn(20, 12)
    out = model(x)
    cb = model.codebooks_LKH
    q_sum = sum(cb[lv][out.codes_BL[:, lv]] for lv in range(model.n_layers))
    torch.testing.assert_close(out.zq_BH, q_sum)
    # Codes are the greedy nearest codes of the residuals.
    r = out.z_BH.detach().clone()
    commit = 0.0
    for lv in range(model.n_layers):
        idx = torch.cdist(r, cb[lv]).argmin(1)
        assert torch.equal(idx, out.codes_BL[:, lv])
        commit += 0.25 * ((r - cb[lv][idx]) ** 2).sum(1).mean()
        r = r - cb[lv][idx]
    torch.testing.assert_close(out.commit, commit)
    recon = ((out.x_hat_BD - x) ** 2).sum(1).mean()
    torch.testing.assert_close(out.recon, recon)
    # Not the per-dim mean (a loss that weak lets the codebooks collapse).
    assert out.recon > 5 * ((out.x_hat_BD - x) ** 2).mean()
    assert out.codebook.item() == 0.0
    torch.testing.assert_close(out.loss, out.recon + out.commit)


def test_stats_layout_and_single_all_reduce():
    torch.manual_seed(2)
    model = tiny_model()
    x = torch.randn(40, 12)
    out = model(x)
    s = out.stats_LKC
    assert s.shape == (3, 8, 1 + 4)
    for lv in range(3):
        idx = out.codes_BL[:, lv]
        torch.testing.assert_close(s[lv, :, 0], torch.bincount(idx, minlength=8).float())
        ref = torch.zeros(8, 4).index_add_(0, idx, out.residuals_LBH[lv])
        torch.testing.assert_close(s[lv, :, 1:], ref)
    calls = []
    model.ema_update(s, all_reduce=lambda t: calls.append(t.shape))
    assert calls == [(3, 8, 5)]
    model.eval()
    assert model(x).stats_LKC is None


def test_two_workers_match_each_other_and_single_worker():
    torch.manual_seed(3)
    base = tiny_model(decay=0.8)
    base.init_codebooks_kmeans(base.encoder(torch.randn(200, 12)).detach(), lloyd_kmeans)
    a, b, single = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    for _step in range(3):
        x = torch.randn(64, 12)
        sa, sb = a(x[:32]).stats_LKC, b(x[32:]).stats_LKC
        sa0, sb0 = sa.clone(), sb.clone()
        a.ema_update(sa, all_reduce=lambda t, other=sb0: t.add_(other))  # "the other worker's" stats
        b.ema_update(sb, all_reduce=lambda t, other=sa0: t.add_(other))
        single.ema_update(single(x).stats_LKC)
        assert torch.equal(a.codebooks_LKH, b.codebooks_LKH)
        assert torch.equal(a.ema_count_LK, b.ema_count_LK)
        torch.testing.assert_close(a.codebooks_LKH, single.codebooks_LKH, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.ema_sum_LKH, single.ema_sum_LKH, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.codebooks_LKH, base.codebooks_LKH)


def test_ema_update_matches_ema_step_per_level():
    torch.manual_seed(4)
    model = tiny_model()
    count0, sum0 = model.ema_count_LK.clone(), model.ema_sum_LKH.clone()
    out = model(torch.randn(50, 12))
    stats = out.stats_LKC.clone()
    model.ema_update(out.stats_LKC)
    for lv in range(3):
        ref = ema_step(count0[lv], sum0[lv], stats[lv, :, 0], stats[lv, :, 1:], model.decay, model.eps)
        torch.testing.assert_close(model.codebooks_LKH[lv], ref.codebook_KD)
        torch.testing.assert_close(model.ema_count_LK[lv], ref.count_K)


def test_dead_code_restart_uses_broadcast_and_touches_only_dead_codes():
    torch.manual_seed(5)
    model = tiny_model(dead_code_threshold=0.5)
    model.ema_count_LK.fill_(2.0)
    dead = [(0, 1), (0, 6), (2, 3)]
    for lv, k in dead:
        model.ema_count_LK[lv, k] = 0.1
    model.ema_count_LK[1, 2] = 0.5  # exactly at threshold: alive
    cb0, cnt0, sum0 = (t.clone() for t in (model.codebooks_LKH, model.ema_count_LK, model.ema_sum_LKH))
    out = model(torch.randn(30, 12))

    rank0_values = torch.randn(len(dead), 4)
    calls = []

    def broadcast(t):  # rank 0's choice overwrites this rank's, in place
        calls.append(t.shape)
        t.copy_(rank0_values)

    n = model.restart_dead_codes(out.residuals_LBH, torch.Generator().manual_seed(0), broadcast)
    assert n == [2, 0, 1]
    assert calls == [(3, 4)]
    mask = torch.zeros(3, 8, dtype=torch.bool)
    for lv, k in dead:
        mask[lv, k] = True
    torch.testing.assert_close(model.codebooks_LKH[mask], rank0_values)
    assert torch.equal(model.codebooks_LKH[~mask], cb0[~mask])
    assert torch.equal(model.ema_count_LK[~mask], cnt0[~mask])
    assert torch.equal(model.ema_sum_LKH[~mask], sum0[~mask])
    assert (model.ema_count_LK[mask] >= model.dead_code_threshold).all()
    torch.testing.assert_close(model.ema_sum_LKH[mask], rank0_values * model.ema_count_LK[mask, None])

    # Without a broadcast the vectors come from the residuals of that level.
    model2 = tiny_model(dead_code_threshold=0.5)
    model2.ema_count_LK.fill_(2.0)
    model2.ema_count_LK[1, 4] = 0.0
    out2 = model2(torch.randn(30, 12))
    assert model2.restart_dead_codes(out2.residuals_LBH, torch.Generator().manual_seed(1)) == [0, 1, 0]
    assert (out2.residuals_LBH[1] == model2.codebooks_LKH[1, 4]).all(1).any()
    # Nothing dead: no broadcast at all (every rank skips it alike).
    calls.clear()
    assert model2.restart_dead_codes(out2.residuals_LBH, torch.Generator(), broadcast) == [0, 0, 0]
    assert calls == []


def test_kmeans_init_sets_consistent_state_and_is_not_redone():
    torch.manual_seed(6)
    model = tiny_model()
    z = torch.randn(300, 4)
    assert model.init_codebooks_kmeans(z, lloyd_kmeans)
    assert model.is_initialized
    resid = z.clone()
    for lv in range(3):
        cb = model.codebooks_LKH[lv]
        torch.testing.assert_close(cb, lloyd_kmeans(resid, 8))
        idx = torch.cdist(resid, cb).argmin(1)
        torch.testing.assert_close(model.ema_count_LK[lv], torch.bincount(idx, minlength=8).float())
        torch.testing.assert_close(model.ema_sum_LKH[lv], cb * model.ema_count_LK[lv, :, None])
        resid = resid - cb[idx]
    # The flag survives a state-dict round trip, so a resumed run skips the init.
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    before = fresh.codebooks_LKH.clone()
    assert not fresh.init_codebooks_kmeans(torch.randn(300, 4), lloyd_kmeans)
    assert torch.equal(fresh.codebooks_LKH, before)
    # A receiving rank passes no latents and gets rank 0's state through broadcast.
    src = dict(
        zip(("cb", "cnt", "sum"), (model.codebooks_LKH, model.ema_count_LK, model.ema_sum_LKH), strict=True)
    )
    queue = [src["cb"], src["cnt"], src["sum"]]
    recv = tiny_model()
    assert recv.init_codebooks_kmeans(None, lloyd_kmeans, broadcast=lambda t: t.copy_(queue.pop(0)))
    assert torch.equal(recv.codebooks_LKH, model.codebooks_LKH)
    assert torch.equal(recv.ema_sum_LKH, model.ema_sum_LKH)


def test_encode_and_decode_match_eval_forward():
    torch.manual_seed(7)
    model = tiny_model()
    x = torch.randn(50, 12)
    model.eval()
    out = model(x)
    codes = model.encode(x, chunk=16)
    assert torch.equal(codes, out.codes_BL)
    torch.testing.assert_close(model.decode_codes(codes), out.x_hat_BD)
    model.train()
    model.encode(x)
    assert model.training  # encode restores the mode


def test_no_ema_codebooks_are_parameters_and_learn():
    torch.manual_seed(8)
    model = tiny_model(use_ema=False)
    assert isinstance(model.codebooks_LKH, torch.nn.Parameter)
    assert "codebooks_LKH" in dict(model.named_parameters())
    out = model(torch.randn(32, 12))
    assert out.codebook > 0
    torch.testing.assert_close(out.loss, out.recon + out.commit + out.codebook)
    out.loss.backward()
    g = model.codebooks_LKH.grad
    assert g is not None
    used = torch.zeros(3, 8, dtype=torch.bool)
    for lv in range(3):
        used[lv, out.codes_BL[:, lv]] = True
    assert (g.abs().sum(-1)[used] > 0).all()
    assert (g.abs().sum(-1)[~used] == 0).all()  # codebook loss only reaches chosen codes
    # ema_update still tracks usage (for dead-code restart) but leaves the codebook alone.
    cb = model.codebooks_LKH.detach().clone()
    model.ema_update(out.stats_LKC)
    assert torch.equal(model.codebooks_LKH.detach(), cb)
    assert not torch.equal(model.ema_count_LK, torch.ones(3, 8))
    # EMA model: buffers only, no gradient reaches the codebook.
    ema = tiny_model()
    assert "codebooks_LKH" not in dict(ema.named_parameters())
    assert "codebooks_LKH" in dict(ema.named_buffers())


def test_gumbel_runs_and_gives_gradient():
    torch.manual_seed(9)
    with pytest.raises(ValueError):
        tiny_model(gumbel=True)
    model = tiny_model(use_ema=False, gumbel=True)
    model.temperature = 0.5
    out = model(torch.randn(32, 12))
    # Hard forward: the decoder input is still a sum of real codewords.
    cb = model.codebooks_LKH.detach()
    q = sum(cb[lv][out.codes_BL[:, lv]] for lv in range(3))
    torch.testing.assert_close(out.zq_BH.detach(), q)
    out.recon.backward(retain_graph=True)
    assert model.codebooks_LKH.grad.abs().sum() > 0  # recon reaches codebooks via the sample
    assert model.encoder[0].weight.grad.abs().sum() > 0
    model.eval()
    codes = model.encode(torch.randn(5, 12))
    assert codes.shape == (5, 3)


def test_tiny_training_reduces_recon_and_uses_codes():
    torch.manual_seed(10)
    x = clusters()
    model = RQVAE(16, 4, n_layers=2, n_embed=8, hidden_dims=(64, 32), decay=0.9, dead_code_threshold=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = model(x[:256]).recon.item()
    model.init_codebooks_kmeans(model.encoder(x[:512]).detach(), lloyd_kmeans, batch_size=128)
    restarts = 0
    for step in range(300):
        batch = x[torch.randint(len(x), (128,), generator=gen)]
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.ema_update(out.stats_LKC)
        if step % 10 == 0:
            restarts += sum(model.restart_dead_codes(out.residuals_LBH, gen))
    model.eval()
    with torch.no_grad():
        final = model(x).recon.item()
    assert final < 0.1 * first, (first, final)
    rel = final / (x**2).sum(1).mean().item()
    assert rel < 0.05, rel
    codes = model.encode(x)
    for lv in range(2):
        assert len(torch.unique(codes[:, lv])) >= 6
    # 8 clusters, 8 level-0 codes: the tuples separate the clusters (few collisions of pairs).
    assert len(torch.unique(codes, dim=0)) >= 8
