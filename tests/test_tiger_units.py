"""TIGER mode pieces that need no Ray: global batches, the epoch loop at world 1, plots, run names,
checkpoint payloads. Seconds in total."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import make_catalog
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.rqvae import RQVAE
from semid_dist.tiger import batches, checkpoint, plots, steps, trainer
from semid_dist.tiger.collectives import Collectives
from semid_dist.tokenizer import Tokenizer


def small_cfg(**kw) -> Config:
    base = dict(
        data_path="x",
        output_dir="y",
        n_layers=2,
        n_embed=4,
        latent_dim=3,
        batch_size=50,
        patience=0,
        epochs=2,
        val_fraction=0.1,
    )
    base.update(kw)
    return Config(**base).validated()


def build(cfg: Config, n: int = 200, d: int = 16):
    ids, x = make_catalog(n, d, seed=2, n_clusters=4)
    comm = Collectives()
    data = steps.RankData.build(ids, x, cfg, comm, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = RQVAE(**steps.model_args(cfg, d))
    steps.init_weights(model)
    return comm, data, model


def test_rank_data_does_not_depend_on_arrival_order():
    """Rows arrive in whatever order Ray Data delivers them; each must land in the same place
    (train then validation, each sorted by ItemID)."""
    cfg = small_cfg(val_fraction=0.2)
    ids, x = make_catalog(300, 8, seed=5, n_clusters=3)
    builds = []
    for seed in (1, 2):
        perm = np.random.default_rng(seed).permutation(len(ids))
        builds.append(steps.RankData.build(ids[perm], x[perm], cfg, Collectives(), torch.device("cpu")))
    one, other = builds
    assert np.array_equal(one.ids_train_T, other.ids_train_T) and np.all(np.diff(one.ids_train_T) > 0)
    assert torch.equal(one.x_train_TD, other.x_train_TD) and torch.equal(one.x_val_VD, other.x_val_VD)
    row = {int(i): x[k] for k, i in enumerate(ids)}
    assert all(np.array_equal(other.x_val_VD[j].numpy(), row[int(i)]) for j, i in enumerate(other.ids_val_V))
    assert 0 < len(other.ids_val_V) < 120


def test_rank_data_rearranges_a_consumed_array_in_place_and_leaves_others_alone():
    cfg = small_cfg(val_fraction=0.2)
    ids, x = make_catalog(257, 6, seed=9, n_clusters=3)
    keep = x.copy()
    copied = steps.RankData.build(ids, x, cfg, Collectives(), torch.device("cpu"))
    assert np.array_equal(x, keep)  # not consume: the caller's array is untouched
    mine = x.copy()
    consumed = steps.RankData.build(ids, mine, cfg, Collectives(), torch.device("cpu"), consume=True)
    assert torch.equal(copied.x_train_TD, consumed.x_train_TD) and torch.equal(
        copied.x_val_VD, consumed.x_val_VD
    )
    assert np.shares_memory(consumed.x_train_TD.numpy(), mine)  # rearranged where it was
    row = {int(i): keep[k] for k, i in enumerate(ids)}
    assert all(
        np.array_equal(consumed.x_train_TD[j].numpy(), row[int(i)])
        for j, i in enumerate(consumed.ids_train_T)
    )


def test_read_cpus_leave_one_core_per_train_worker(ray_session):
    from semid_dist.catalog import plumbing
    from semid_dist.config import Config
    from semid_dist.tiger.trainer import read_cpus

    cores = plumbing.parallelism()
    assert read_cpus(Config(num_workers=1)) == max(1, cores - 1)
    assert read_cpus(Config(num_workers=cores + 3)) == 1


def test_training_dataset_reads_within_the_cpu_limit(ray_session):
    """The limit must reach the dataset the workers' splits stream from, and leave the
    caller's dataset alone."""
    from semid_dist.tiger.trainer import _EveryRowDataConfig

    ds = ray_session.data.range(10)
    before = ds.context.execution_options.resource_limits.cpu
    fed = _EveryRowDataConfig(read_cpus=1).ingest(ds)
    assert fed.context.execution_options.resource_limits.cpu == 1
    assert ds.context.execution_options.resource_limits.cpu == before != 1


def test_read_shard_grows_past_the_expected_size(ray_session):
    """A worker's shard can be bigger than n_items / workers (streaming_split(equal=False))."""
    import pyarrow as pa

    from semid_dist.tiger.worker import read_shard

    ids, x = make_catalog(1000, 5, seed=4, n_clusters=2)
    tables = [
        pa.table(
            {"ItemID": ids[a : a + 300], "embedding": pa.array(list(x[a : a + 300]), pa.list_(pa.float32()))}
        )
        for a in range(0, 1000, 300)
    ]
    for expect in (0, 7, 1000, 5000):
        got_ids, got_x = read_shard(ray_session.data.from_arrow(tables).iterator(), 5, expect)
        order = np.argsort(got_ids)
        assert np.array_equal(got_ids[order], np.sort(ids)) and got_x.shape == (1000, 5)
        assert np.array_equal(got_x[order], x[np.argsort(ids)])


def test_read_shard_takes_blocks_of_many_chunks(ray_session):
    """A read task's block is its read batches side by side (one Arrow chunk each): every row
    arrives once, in place, and a bad row in a later chunk is named by its ItemID."""
    import pyarrow as pa

    from semid_dist.catalog.schema import RowError
    from semid_dist.tiger.worker import read_shard

    ids, x = make_catalog(1000, 5, seed=5, n_clusters=2)

    def block(a: int, b: int, x_ND: np.ndarray) -> pa.Table:  # chunks of 64 rows, like read batches
        return pa.concat_tables(
            [
                pa.table(
                    {
                        "ItemID": ids[c : min(c + 64, b)],
                        "embedding": pa.array(list(x_ND[c : min(c + 64, b)]), pa.list_(pa.float32())),
                    }
                )
                for c in range(a, b, 64)
            ]
        )

    blocks = [block(a, min(a + 400, 1000), x) for a in range(0, 1000, 400)]
    ds = ray_session.data.from_arrow(blocks)
    assert (
        max(
            b.column("embedding").num_chunks for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)
        )
        > 1
    )
    got_ids, got_x = read_shard(ds.iterator(), 5, 1000)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_x, x)
    bad = x.copy()
    bad[700, 2] = np.nan  # block 1, chunk 4
    with pytest.raises(RowError, match=f"ItemID {ids[700]}: embedding contains NaN"):
        read_shard(
            ray_session.data.from_arrow(
                [block(a, min(a + 400, 1000), bad) for a in range(0, 1000, 400)]
            ).iterator(),
            5,
            1000,
        )


def test_evaluate_errors_match_float64_over_every_row(monkeypatch):
    """evaluate's reconstruction errors, summed chunk by chunk from float32 row norms, equal
    the float64 sums over every element, for the validation split and for all items."""
    monkeypatch.setattr(steps, "EVAL_CHUNK", 64)  # several chunks, and a short last one
    cfg = small_cfg()
    comm, data, model = build(cfg, n=300)
    steps.init_codebooks(model, data, cfg, comm)
    ev, _ = steps.evaluate(model, data, comm)

    def sq_err(x: torch.Tensor) -> tuple[float, float]:
        recon = model.decode_codes(model.encode(x)).detach().double()
        return float((x.double() - recon).pow(2).sum()), float(x.double().pow(2).sum())

    (v_err, v_norm), (t_err, t_norm) = sq_err(data.x_val_VD), sq_err(data.x_train_TD)
    assert data.n_val > 0 and ev["val_recon"] == pytest.approx(v_err / data.n_val, rel=1e-6)
    assert ev["val_rel_recon"] == pytest.approx(v_err / v_norm, rel=1e-6)
    assert ev["rel_recon"] == pytest.approx((v_err + t_err) / (v_norm + t_norm), rel=1e-6)


def test_validation_only_evaluation_and_its_schedule():
    """evaluate(catalog=False) gives the same validation numbers as the full evaluation and
    nothing over all items; the catalog is evaluated every eval_every epochs and at the last."""
    cfg = small_cfg()
    comm, data, model = build(cfg, n=300)
    steps.init_codebooks(model, data, cfg, comm)
    full, usage = steps.evaluate(model, data, comm)
    val, none = steps.evaluate(model, data, comm, catalog=False)
    assert none is None and usage is not None and model.training
    assert val["val_recon"] == full["val_recon"] and val["val_rel_recon"] == full["val_rel_recon"]
    assert all(val[k] is None for k in steps.CATALOG_METRICS)
    assert all(full[k] is not None for k in steps.CATALOG_METRICS)

    due = [e for e in range(1, 24) if steps.catalog_eval_due(e, cfg.replace(epochs=23, eval_every=5))]
    assert due == [5, 10, 15, 20, 23]
    assert all(steps.catalog_eval_due(e, cfg.replace(epochs=3, eval_every=1)) for e in (1, 2, 3))
    with pytest.raises(UserError, match="eval_every"):
        cfg.replace(eval_every=0)  # a one-line error, not a ZeroDivisionError mid-training


def test_an_early_stop_between_catalog_epochs_still_evaluates_every_item():
    from semid_dist.tiger.worker import evaluate_epoch

    cfg = small_cfg(epochs=50, eval_every=10, patience=1)
    comm, data, model = build(cfg, n=300)
    steps.init_codebooks(model, data, cfg, comm)
    going = checkpoint.LoopState(best_val=float("inf"))  # this epoch improves: no stop
    ev, usage = evaluate_epoch(model, data, comm, cfg, going, 3)
    assert not going.stopped_early and usage is None and ev["dup_rate"] is None
    stopping = checkpoint.LoopState(best_val=0.0)  # cannot improve: patience 1 stops here
    ev, usage = evaluate_epoch(model, data, comm, cfg, stopping, 3)
    assert stopping.stopped_early and usage is not None and ev["dup_rate"] is not None
    ev10, usage10 = evaluate_epoch(model, data, comm, cfg, checkpoint.LoopState(best_val=float("inf")), 10)
    assert usage10 is not None and ev10 == ev


def test_global_batches_do_not_depend_on_sharding():
    ids = np.random.default_rng(0).permutation(10_000)[:997].astype(np.int64) + 5
    nb = batches.num_batches(997, 64)
    whole = batches.epoch_batch_index(ids, 42, 3, nb)
    halves = np.concatenate(
        [batches.epoch_batch_index(ids[:400], 42, 3, nb), batches.epoch_batch_index(ids[400:], 42, 3, nb)]
    )
    assert np.array_equal(whole, halves)
    assert not np.array_equal(whole, batches.epoch_batch_index(ids, 42, 4, nb))  # reshuffled
    order, off = batches.group_rows(whole, nb)
    assert off[-1] == 997 and np.all(np.diff(off) >= 0)
    for j in range(nb):
        rows = order[off[j] : off[j + 1]]
        assert np.all(whole[rows] == j) and np.all(np.diff(rows) > 0)  # input order kept
    sizes = np.diff(off)
    assert sizes.min() > 0.5 * 64 and sizes.max() < 1.5 * 64
    val = batches.validation_mask(ids, 42, 0.1)
    assert 0.05 < val.mean() < 0.15
    assert np.array_equal(val[:400], batches.validation_mask(ids[:400], 42, 0.1))


def test_epoch_loop_at_world_one():
    cfg = small_cfg()
    comm, data, model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert steps.init_codebooks(model, data, cfg, comm) and model.is_initialized
    assert not steps.init_codebooks(model, data, cfg, comm)  # done once
    seen = []

    class Hooks(steps.NoHooks):
        def before_step(self, step: int) -> None:
            seen.append(step)

    loop = steps.Loop(model, model, opt, data, cfg, comm, restart_every=2, hooks=Hooks())
    metrics, step = steps.train_epoch(loop, 0, 0)
    assert step == len(seen) == data.n_batches and seen == list(range(step))
    ev, usage = steps.evaluate(model, data, comm)
    assert usage.shape == (2, 4) and usage.sum() == 2 * 200
    assert model.training  # evaluate restores the mode
    assert 0 <= ev["dup_rate"] < 1 and ev["val_recon"] > 0 and metrics["loss"] > 0
    assert ev["codes_used"] == [int((u > 0).sum()) for u in usage]


def test_init_weights_keep_latent_scale():
    """torch's default init shrinks the latent ~40x through the original tool's MLP (the collapse trap
    noted in steps.init_weights); He init keeps it within a small factor of the input."""
    x = torch.nn.functional.normalize(torch.randn(512, 768), dim=1)
    torch.manual_seed(0)
    model = RQVAE(768, 32, 3, 16)
    default = model.encoder(x).norm(dim=1).mean().item()
    steps.init_weights(model)
    he = model.encoder(x).norm(dim=1).mean().item()
    assert default < 0.01 < 0.05 < he < 1.0, (default, he)


def test_gumbel_mode_trains_with_decaying_temperature():
    cfg = small_cfg(use_ema=False, gumbel=True, gumbel_temperature=1.0, gumbel_temperature_min=0.1, epochs=3)
    assert [round(steps.temperature(cfg, e), 4) for e in range(3)] == [1.0, 0.3162, 0.1]
    comm, data, model = build(cfg)
    assert "codebooks_LKH" in dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps.init_codebooks(model, data, cfg, comm)
    before = model.codebooks_LKH.detach().clone()
    model.temperature = steps.temperature(cfg, 1)
    metrics, _ = steps.train_epoch(steps.Loop(model, model, opt, data, cfg, comm), 1, 0)
    assert metrics["codebook"] > 0
    assert not torch.equal(before, model.codebooks_LKH.detach())  # learned by gradient


def test_run_name_ignores_how_long_and_where():
    a = small_cfg(mode="tiger")
    assert trainer.run_name(a, 16, 100) == trainer.run_name(
        a.replace(epochs=50, num_workers=4, patience=3, resume=True, max_failures=2), 16, 100
    )
    assert trainer.run_name(a, 16, 100) != trainer.run_name(a.replace(learning_rate=0.1), 16, 100)
    assert trainer.run_name(a, 16, 100) != trainer.run_name(a, 16, 101)
    assert trainer.storage_root(a).endswith("/y/.ray_train")
    assert trainer.storage_root(a.replace(output_dir="s3://b/p")) == "s3://b/p/.ray_train"


def test_checkpoint_round_trip_and_original_tool_payload(tmp_path):
    cfg = small_cfg()
    comm, data, model = build(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps.init_codebooks(model, data, cfg, comm)
    steps.train_epoch(steps.Loop(model, model, opt, data, cfg, comm), 0, 0)
    state = checkpoint.LoopState(epoch=1, step=4, history=[{"epoch": 1, "loss": 0.5}], best_val=0.3)
    args = steps.model_args(cfg, 16)
    checkpoint.save(str(tmp_path), model, opt, state, args, cfg.to_dict())
    saved = checkpoint.load(str(tmp_path))
    assert checkpoint.loop_state(saved) == state
    payload = checkpoint.original_tool_payload(saved)
    buf = io.BytesIO()
    torch.save(payload, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert loaded["epoch"] == 1 and loaded["metrics"]["loss"] == 0.5
    tok = Tokenizer.from_payload(loaded)  # every checkpoint_epoch_*.pt is a usable tokenizer
    x = data.x_train_TD[:10]
    assert np.array_equal(tok.encode(x), model.encode(x).numpy())


def test_plots_are_png():
    hist = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "recon": 0.8 / e,
            "commit": 0.2 / e,
            "codebook": 0.0,
            "rel_recon": 0.5 / e,
            "val_rel_recon": 0.55 / e,
            "codes_used": [4, 3],
            "perplexity": [3.5, 2.5],
            "dup_rate": 0.1 / e,
        }
        for e in range(1, 4)
    ]
    for png in (plots.training_curves(hist), plots.code_usage(np.array([[5, 3, 0, 1], [2, 2, 2, 3]]))):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.parametrize("values", [[1.0, 2.0], []])
def test_collectives_are_identity_at_world_one(values):
    comm = Collectives()
    assert comm.world == 1 and comm.rank == 0
    t = torch.arange(6.0).reshape(3, 2)
    assert comm.sum_(t) is t and comm.broadcast0_(t) is t and comm.gather_rows(t) is t
    assert comm.sum_numbers(values) == values


def test_keep_model_score_ranks_evaluation_epochs():
    """--keep_model best: only epochs with the catalog-wide evaluation compete; the validation
    error decides, the collision rate breaks ties; without a validation split the catalog's
    error stands in."""
    no_eval = {"epoch": 1, "val_rel_recon": 0.1, "rel_recon": None, "dup_rate": None}
    a = {"epoch": 2, "val_rel_recon": 0.30, "rel_recon": 0.31, "dup_rate": 0.02}
    b = {"epoch": 3, "val_rel_recon": 0.30, "rel_recon": 0.29, "dup_rate": 0.01}
    c = {"epoch": 4, "val_rel_recon": None, "rel_recon": 0.25, "dup_rate": 0.05}
    assert steps.model_score(no_eval) is None
    assert min([a, b], key=steps.model_score)["epoch"] == 3  # tie on validation: fewer collisions
    assert steps.model_score(c) == (0.25, 0.05)
