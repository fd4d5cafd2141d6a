"""TIGER under Ray Train: DDP equivalence, fault tolerance, resume, the CLI end to end.

One uninterrupted 2-worker run is the reference for every other run in this file:
  * its two ranks hold bit-identical codebooks/EMA state after every step (digests per step);
  * a 1-worker run over the same global batches ends with the same codebooks (float tolerance);
  * a run whose worker dies mid-epoch (the fail_at_step test hook, --max_failures 1) restarts from its last
    checkpoint and ends with the same codebooks;
  * through the CLI, a run that dies with --max_failures 0 fails with a clear message and
    publishes nothing; rerun with --resume it completes from its last checkpoint, publishes every
    output, and ends with the same codebooks.
Tiny catalog and model; five Ray Train runs in all.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_catalog, write_shards
from semid_dist import cli, load_tokenizer, testhooks
from semid_dist.catalog.schema import inspect_catalog
from semid_dist.catalog.source import training_dataset
from semid_dist.config import Config
from semid_dist.io.storage import Storage
from semid_dist.tiger import trainer

# Ray Train's controller polls its workers every 2 s; every run here is a few seconds of work, so
# poll faster (saves ~10 s per run on 2 cores). Read by the controller process, which inherits
# this environment when the session's Ray starts (ray_session runs after collection).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

pytestmark = pytest.mark.slow

N_ITEMS, DIM = 384, 24


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiger_catalog")
    ids, x = make_catalog(N_ITEMS, DIM, seed=5, n_clusters=8)
    write_shards(str(d / "data"), ids, x, 3)  # 3 shards over 2 workers: uneven on purpose
    return str(d)


def tiny_cfg(root: str, **kw) -> Config:
    base = dict(
        data_path=os.path.join(root, "data"),
        output_dir=os.path.join(root, "out"),
        mode="tiger",
        n_layers=2,
        n_embed=8,
        latent_dim=4,
        batch_size=64,
        epochs=3,
        learning_rate=3e-3,
        save_every=1,
        patience=0,
        val_fraction=0.1,
        dead_code_threshold=3.0,  # ~8 rows per code per batch: some restarts happen
        eval_every=2,  # epoch 1 evaluates the validation split only, epochs 2 and 3 all items
        num_workers=2,
    )
    base.update(kw)
    return Config(**base).validated()


def run(cfg: Config, trace_dir: str | None = None, fail_at_step: int = -1) -> trainer.TrainRun:
    store = Storage()
    info = inspect_catalog(store.list_parquet(cfg.data_path), store)
    ds = training_dataset(info, info.num_rows)
    return trainer.train(
        cfg, ds, info.dim, info.num_rows, store, trace_dir=trace_dir, fail_at_step=fail_at_step
    )


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(ray_session, catalog, tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("trace"))
    result = run(tiny_cfg(catalog), trace_dir=trace)
    return result, trace


def test_ranks_bit_identical_every_step_and_match_one_worker(ray_session, catalog, reference, tmp_path):
    two, trace = reference
    r0, r1 = read_trace(os.path.join(trace, "rank0.jsonl")), read_trace(os.path.join(trace, "rank1.jsonl"))
    assert len(r0) == two.loop.step > 3 * 5
    assert [t["step"] for t in r0] == list(range(two.loop.step))
    assert r0 == r1  # codebooks, EMA counts and EMA sums: same bytes on both ranks, every step
    assert len({t["codebooks"] for t in r0}) == len(r0)  # and they did change every step
    assert sum(sum(h["restarted"]) for h in two.loop.history) > 0  # restart + broadcast exercised

    one = run(tiny_cfg(catalog, num_workers=1, output_dir=str(tmp_path / "one")))
    assert one.loop.step == two.loop.step
    torch.testing.assert_close(one.model.codebooks_LKH, two.model.codebooks_LKH, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one.model.ema_count_LK, two.model.ema_count_LK, rtol=1e-4, atol=1e-5)
    for a, b in zip(one.loop.history, two.loop.history, strict=True):
        assert a["restarted"] == b["restarted"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_recon"] == pytest.approx(b["val_recon"], rel=1e-4)
    # eval_every=2: all items on epochs 2 and 3 (the last), the same on 1 and 2 workers
    assert [h["dup_rate"] is not None for h in two.loop.history] == [False, True, True]
    assert [h["dup_rate"] for h in one.loop.history] == [h["dup_rate"] for h in two.loop.history]
    assert [e for e, _ in two.checkpoints] == [1, 2, 3]


def test_a_local_ray_starts_no_preemption_watcher(ray_session, reference):
    """semid_dist.runtime.LOCAL_TRAIN_ENV reaches Ray Train's controller: the runs on the
    session's Ray (started as the CLI starts one) had a controller and no preemption watcher.
    Ray's own actor table, read from the GCS: the state API needs the dashboard, which a local
    Ray here does not start."""
    classes = {a["ActorClassName"] for a in ray_session._private.state.actors().values()}
    assert "TrainController" in classes, classes
    assert "PreemptionWatcher" not in classes, classes


def test_worker_failure_restarts_from_last_checkpoint(ray_session, catalog, reference, tmp_path):
    two, _ = reference
    fail_at = two.loop.history[1]["step"] + 2  # inside epoch 3, after the epoch-2 checkpoint
    cfg = tiny_cfg(catalog, output_dir=str(tmp_path / "out"), max_failures=1)
    res = run(cfg, fail_at_step=fail_at)
    marker = os.path.join(res.run_dir, f"fail_at_step_{fail_at}.done")
    assert os.path.exists(marker)  # the failure did happen (once)
    assert [h["epoch"] for h in res.loop.history] == [1, 2, 3]
    torch.testing.assert_close(res.model.codebooks_LKH, two.model.codebooks_LKH, rtol=1e-5, atol=1e-6)


def cli_args(cfg: Config, log_dir: str) -> list[str]:
    args = ["train", "--log_dir", log_dir]
    for name in (
        "data_path",
        "output_dir",
        "mode",
        "n_layers",
        "n_embed",
        "latent_dim",
        "batch_size",
        "epochs",
        "learning_rate",
        "save_every",
        "patience",
        "val_fraction",
        "dead_code_threshold",
        "eval_every",
        "num_workers",
    ):
        args += [f"--{name}", str(getattr(cfg, name))]
    return args


def test_cli_failure_then_resume_publishes_everything(
    ray_session, catalog, reference, tmp_path, capsys, monkeypatch
):
    two, _ = reference
    out = tmp_path / "published"
    cfg = tiny_cfg(catalog, output_dir=str(out))
    args = cli_args(cfg, str(tmp_path / "logs"))
    fail_at = two.loop.history[0]["step"] + 1  # epoch 2, after the epoch-1 checkpoint

    with monkeypatch.context() as m:
        m.setenv(testhooks.FAIL_AT_STEP_ENV, str(fail_at))
        assert cli.main(args + ["--max_failures", "0"]) == 1
    err = capsys.readouterr().err
    assert "injected failure at step" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "final_model.pt").exists() and not (out / "_SUCCESS").exists()
    assert (out / ".ray_train").is_dir()  # the checkpoints survive for --resume

    assert cli.main(args + ["--resume"]) == 0
    capsys.readouterr()
    for name in (
        "_SUCCESS",
        "final_model.pt",
        "semantic_id_mappings.json",
        "semantic_id_mappings.parquet",
        "training_results.json",
        "training_curves.png",
        "code_usage.png",
        "checkpoint_epoch_1.pt",
        "checkpoint_epoch_2.pt",
        "checkpoint_epoch_3.pt",
    ):
        assert (out / name).is_file(), name
    for png in ("training_curves.png", "code_usage.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    payload = torch.load(out / "final_model.pt", weights_only=True)
    torch.testing.assert_close(
        payload["state_dict"]["codebooks_LKH"], two.kept_model().codebooks_LKH, rtol=1e-5, atol=1e-6
    )  # resumed == uninterrupted, and it kept the same epoch
    # --keep_model best (the default): the evaluation epoch with the lowest validation error,
    # then the lower collision rate; its model is checkpoint_epoch_<epoch>.pt's
    results = json.loads((out / "training_results.json").read_text())
    kept = results["training"]["kept_model"]
    evaluated = [h for h in results["training"]["history"] if h.get("rel_recon") is not None]
    assert [h["epoch"] for h in evaluated] == [2, 3]
    best = min(evaluated, key=lambda h: (h["val_rel_recon"], h["dup_rate"]))
    assert kept["epoch"] == best["epoch"] == two.loop.kept_epoch and kept["keep_model"] == "best"
    in_ckpt = torch.load(out / f"checkpoint_epoch_{best['epoch']}.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(payload["state_dict"][k], in_ckpt[k]) for k in in_ckpt)
    tok = load_tokenizer(str(out / "final_model.pt"))
    mapping = json.loads((out / "semantic_id_mappings.json").read_text())
    ids, x = make_catalog(N_ITEMS, DIM, seed=5, n_clusters=8)
    codes = tok.encode(x)
    assert codes.shape == (N_ITEMS, 2)
    assert [mapping[str(i)][:2] for i in ids[:20]] == codes[:20].tolist()
    ckpt1 = torch.load(out / "checkpoint_epoch_1.pt", weights_only=True)
    assert ckpt1["epoch"] == 1 and load_tokenizer(str(out / "checkpoint_epoch_1.pt")).n_layers == 2

    results = json.loads((out / "training_results.json").read_text())
    hist = results["training"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for key in ("loss", "recon", "commit", "codes_used", "perplexity", "dup_rate", "lr", "val_recon"):
        assert key in hist[-1], key
    assert len(hist[-1]["codes_used"]) == 2
    assert "RQVAE" in results["training"]["model_architecture"]
    assert results["training"]["hyperparameters"]["n_embed"] == 8
    log_text = next((out / "logs").iterdir()).read_text()
    assert "epoch 3/3" in log_text and "resume" in log_text
    assert f"tiger: {N_ITEMS} rows in the workers' memory" in log_text  # rank 0's intake line


def test_gumbel_codebooks_by_gradient_stay_identical_across_ranks(ray_session, catalog, tmp_path):
    """--no_ema --gumbel under Ray Train with 2 workers: the codebooks are parameters learned
    through DDP's averaged gradients, so both ranks hold the same bytes after every step even
    though each rank draws its own Gumbel noise; the temperature decays per epoch."""
    trace = str(tmp_path / "trace")
    os.makedirs(trace)
    result = run(
        tiny_cfg(
            catalog,
            use_ema=False,
            gumbel=True,
            epochs=2,
            gumbel_temperature=1.0,
            gumbel_temperature_min=0.2,
            output_dir=str(tmp_path / "out"),
        ),
        trace_dir=trace,
    )
    r0, r1 = read_trace(os.path.join(trace, "rank0.jsonl")), read_trace(os.path.join(trace, "rank1.jsonl"))
    assert len(r0) == result.loop.step > 2 * 5
    assert r0 == r1
    assert len({t["codebooks"] for t in r0}) > len(r0) // 2  # learning moves them
    temps = [h["temperature"] for h in result.loop.history]
    assert len(temps) == 2 and temps[0] == pytest.approx(1.0) and 0.2 <= temps[1] < temps[0]
    assert all(h["val_recon"] == h["val_recon"] for h in result.loop.history)  # finite, not NaN


def test_a_diverged_model_is_never_published(ray_session, small_catalog, tmp_path, capsys):
    """The original tool's TIGER learning rate (an Adagrad-style rate) with AdamW: the run stops
    at the first epoch whose loss is not finite or whose validation error is above 1, with one
    line that names the epoch and suggests a rate; the earlier result stays as it was."""
    data, _, _ = small_catalog
    out = tmp_path / "out"
    base = ["train", "--data_path", data, "--output_dir", str(out), "--log_dir", str(tmp_path / "logs")]
    assert cli.main([*base, "--mode", "kmeans", "--n_layers", "2", "--n_clusters", "8"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    tiger = ["--mode", "tiger", "--n_layers", "2", "--n_embed", "8", "--latent_dim", "4", "--epochs", "3"]
    assert cli.main([*base, *tiger, "--batch_size", "64", "--learning_rate", "40"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("semid: error: tiger diverged at epoch 1 (loss ") and "try about 1e-3" in line
    assert "far above what AdamW tolerates" in err  # warned at start-up
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
